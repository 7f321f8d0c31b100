"""The one image loader used by train, evaluate, predict, audit and serve.

Real photo collections contain empty files, truncated JPEGs, HTML saved as .jpg, CMYK and 16-bit files, PNGs with
transparency and phone photos that rely on an EXIF orientation tag. `load_image` turns every readable one into an
8-bit RGB `PIL.Image` the same way everywhere, and turns every unreadable one into an `ImageLoadError` that names
the file and the reason. It never raises anything else for bad input.

Policy (also in the README):
- formats: only JPEG, PNG, WebP, BMP, GIF, TIFF and MPO are opened (an allow-list, so Pillow never tries exotic
  decoders on untrusted uploads);
- pixel limit: more than `max_pixels` pixels is an error, checked from the header before decoding;
- EXIF orientation is applied; animations use their first frame;
- transparency (RGBA, LA, palette with a transparent colour) is composited on a white background;
- 16-bit and 32-bit integer images are scaled to 8 bits by their bit depth, not clipped;
- CMYK, palette, 1-bit, grayscale and YCbCr are converted to RGB.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.init()  # register every plugin now, so the allow-list below can be checked against what Pillow has
ALLOWED_FORMATS = tuple(name for name in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO") if name in Image.OPEN)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")
DEFAULT_MAX_PIXELS = 50_000_000  # ~ 8700 x 5800; a 12 MP phone photo is 12_000_000
TRANSPARENCY_BACKGROUND = (255, 255, 255)

# Pillow's own limit only warns below 2x; ours is an error at the limit, enforced in `load_image`.
Image.MAX_IMAGE_PIXELS = None


class ImageLoadError(Exception):
    """A file that cannot be used as an image. `reason` is a short machine-friendly kind, `detail` says more."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # travels intact from DataLoader worker processes
        return (ImageLoadError, (self.path, self.reason, self.detail))


def has_image_extension(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode `source` (a path, bytes or a binary stream) into an 8-bit RGB image.

    `draft_size`: when given, JPEGs much larger than needed are decoded at a reduced scale (libjpeg's DCT scaling,
    Pillow's draft mode) such that the shorter side stays >= draft_size. This is several times faster for photos
    far larger than the model's input and does not change what the model sees after resizing.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageLoadError(label, "empty file")
            stream: BinaryIO = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                raise ImageLoadError(label, "is a directory")
            if path.stat().st_size == 0:
                raise ImageLoadError(label, "empty file")
            stream = io.BytesIO(path.read_bytes())
        else:
            stream = source
        return _decode(stream, label, max_pixels, draft_size)
    except ImageLoadError:
        raise
    except FileNotFoundError as error:
        raise ImageLoadError(label, "file not found", str(error)) from error
    except PermissionError as error:
        raise ImageLoadError(label, "permission denied", str(error)) from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(label, "too many pixels", str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(label, "not an image or unsupported format") from error
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct_error()) as error:
        # Pillow reports truncated and corrupt data with a zoo of exception types.
        reason = "truncated image" if "truncated" in str(error).lower() else "corrupt image"
        raise ImageLoadError(label, reason, f"{type(error).__name__}: {error}") from error
    except (MemoryError, RecursionError, ZeroDivisionError, OverflowError, AttributeError, RuntimeError) as error:
        raise ImageLoadError(label, "corrupt image", f"{type(error).__name__}: {error}") from error


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def _decode(stream: BinaryIO, label: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd-but-readable files (EXIF, palette transparency)
        image = Image.open(stream, formats=ALLOWED_FORMATS)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(label, "corrupt image", f"size {width}x{height}")
        if width * height > max_pixels:
            raise ImageLoadError(label, "too many pixels", f"{width}x{height} > limit {max_pixels}")
        if getattr(image, "is_animated", False):
            image.seek(0)
        if draft_size and image.format in ("JPEG", "MPO") and min(width, height) >= 2 * draft_size:
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)  # a no-op copy without an orientation tag
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENCY_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit integer / float) single-channel images to 8 bits using the declared depth."""
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(values, 0.0, 1.0 if values.max(initial=0) <= 1.0 else 255.0)
        scaled = scaled * (255.0 if values.max(initial=0) <= 1.0 else 1.0)
    else:
        values = values.astype(np.int64)
        maximum = 65535 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255
        if values.max(initial=0) > 65535:
            maximum = int(values.max())
        scaled = np.clip(values, 0, maximum) * (255.0 / maximum)
    gray = Image.fromarray(np.round(scaled).astype(np.uint8))
    return gray.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image already in memory (the Python API's PIL inputs) converted to 8-bit RGB by the same rules as
    `load_image`: EXIF orientation, transparency on white, 16-bit scaled by its depth."""
    return _to_rgb(ImageOps.exif_transpose(image))
