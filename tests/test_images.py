"""The shared image loader on the odd files real data sets contain."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from catdog.runtime.images import ImageLoadError, load_image


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (20, 10), (0, 255, 255, 0))  # pure red in CMYK
    loaded = load_image(encode(image, "JPEG"))
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    red, green, blue = loaded.getpixel((10, 5))
    assert red > 200 and green < 60 and blue < 60


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    loaded = load_image(encode(image, "PNG"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_is_composited():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    loaded = load_image(encode(image, "PNG", transparency=0))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_and_one_bit_become_rgb():
    gray = load_image(encode(Image.new("L", (5, 5), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    one_bit = load_image(encode(Image.new("1", (5, 5), 1), "PNG"))
    assert one_bit.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.full((4, 4), 32768, dtype=np.uint16)  # half of the 16-bit range
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    loaded = load_image(encode(image, "PNG"))
    red, green, blue = loaded.getpixel((0, 0))
    assert red == green == blue and 126 <= red <= 129


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    loaded = load_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (20, 40)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    red, _, blue = load_image(buffer.getvalue()).getpixel((0, 0))
    assert red > 200 and blue < 50


def test_draft_mode_keeps_shorter_side_large_enough():
    big = Image.new("RGB", (2000, 1500), (10, 20, 30))
    loaded = load_image(encode(big, "JPEG"), draft_size=256)
    assert min(loaded.size) >= 256 and loaded.size[0] < 2000


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty file"),
        (b"<html><body>not a photo</body></html>", "not an image or unsupported format"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 10, None),  # header-only JPEG
        (np.random.default_rng(0).bytes(5000), "not an image or unsupported format"),
    ],
)
def test_bad_bytes_raise_the_loader_error(payload, reason):
    with pytest.raises(ImageLoadError) as raised:
        load_image(payload, name="upload.jpg")
    assert raised.value.path == "upload.jpg"
    if reason:
        assert raised.value.reason == reason


def test_truncated_jpeg_is_reported_with_path(tmp_path):
    data = encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as raised:
        load_image(path)
    assert str(path) in str(raised.value)
    assert raised.value.reason in ("truncated image", "corrupt image")


def test_pixel_limit_is_an_error():
    with pytest.raises(ImageLoadError) as raised:
        load_image(encode(Image.new("L", (3000, 3000)), "PNG"), max_pixels=1_000_000)
    assert raised.value.reason == "too many pixels"


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height grayscale pixels (a decompression bomb's shape)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def test_decompression_bomb_png_is_refused_before_decoding():
    data = png_claiming(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(ImageLoadError) as raised:
        load_image(data)
    assert raised.value.reason == "too many pixels"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path / "folder.jpg")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096))
def test_arbitrary_bytes_only_raise_the_loader_error(payload):
    try:
        image = load_image(payload)
    except ImageLoadError:
        return
    assert image.mode == "RGB"


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 255), st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
def test_mutated_real_images_only_raise_the_loader_error(position, value, format):
    data = bytearray(encode(Image.effect_noise((32, 32), 40).convert("RGB"), format))
    data[position % len(data)] = value
    try:
        load_image(bytes(data[: max(1, len(data) - position % 7)]))
    except ImageLoadError:
        pass
