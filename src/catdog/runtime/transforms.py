"""Preprocessing: how an image becomes the model's input. Runtime layer: Pillow and NumPy, never torch.

The settings travel with each model (`models.ModelSpec.preprocess`), are saved in a run's `meta.json` and inside
every exported model file, so predict, serve and export always preprocess exactly as training did.

The evaluation transform (used for features, evaluation, prediction and serving) is Pillow + NumPy: it is as
fast as torchvision's and keeps torch out of the prediction path. Training-time augmentation (torchvision) is
`catdog.training.augmentation`, in the training layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

EVAL_TRANSFORM_VERSION = 3  # part of the feature-cache key: bump when `EvalTransform` changes its output

# Sensor noise (a dark room, a small camera) is the damage a frozen backbone handles worst after a quarter turn: a
# noise sigma of 25 (of 255) takes the default run from 99.3% to 95.3% (BENCHMARKS.md, "Damaged photos"). A photo
# whose estimated noise is above this gets a 3x3 median filter before it is resized. Measured on 400 validation
# photos (200x200): clean photos estimate 1.6 (median; 99th percentile 8.0, highest 12.7), sigma-12 noise 8.3
# (6.5-), sigma-25 noise 16.4 (13.2-); JPEG, blur, thumbnails, dark photos and screenshots all estimate lower than
# clean ones. So about 1% of clean photos are filtered (fur, grass: a median barely changes them) and every sigma-25
# photo is. End to end (benchmarks/robustness.py, 1,200 validation photos), the default preset (Lite2 at 300 px):
# sigma-25 noise 95.3% -> 96.5%, clean 99.33% -> 99.42%, log loss 0.0191 -> 0.0189. But the fast preset (Lite0 at
# 224 px) got worse with it: sigma-25 noise 94.4% -> 92.8%, clean 98.67% -> 98.58%. So the presets choose
# (`training.config.PRESETS`): the default preset filters, and the built-in model (the same Lite2 at 300 px; its
# noisy photos not measured), the fast one not.
DENOISE_ABOVE = 10.0
NOISE_PATCH = 256  # the noise is estimated on the central patch of at most this many pixels a side (sub-millisecond)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the model's input tensor at evaluation time.

    input_size: side of the square crop the model sees.
    crop_fraction: the image's shorter side is resized to input_size / crop_fraction, then centre-cropped.
    mean, std: per-channel normalisation applied to [0, 1] pixel values.
    interpolation: "bilinear" or "bicubic" resizing.
    denoise_above: a photo whose estimated noise (`noise_level`, grey levels of 255) is above this gets a 3x3 median
        filter first; None: never (so for runs trained before the filter, whose meta.json has no such field). The
        default preset and the built-in model use `DENOISE_ABOVE`.
    """

    input_size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    denoise_above: float | None = None

    def __post_init__(self):
        if self.input_size < 16:
            raise ValueError(f"input_size must be at least 16, got {self.input_size}")
        if not 0.1 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in [0.1, 1], got {self.crop_fraction}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {self.interpolation}")
        if self.denoise_above is not None and not self.denoise_above > 0:
            raise ValueError(f"denoise_above must be positive or None, got {self.denoise_above}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_fraction))

    def to_dict(self) -> dict:
        values = {**asdict(self), "resize_size": self.resize_size}
        if self.denoise_above is None:  # as runs before the field wrote it, so their feature-cache keys still match
            del values["denoise_above"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocess":
        return cls(**{key: values[key] for key in ("input_size", "crop_fraction", "mean", "std", "interpolation")},
                   denoise_above=values.get("denoise_above"))


def noise_level(image: Image.Image) -> float:
    """The standard deviation of the photo's sensor noise in grey levels (of 255), from the photo alone: Immerkaer's
    fast estimator ("Fast Noise Variance Estimation", CVIU 1996), the mean absolute response of a 3x3 mask that
    cancels smooth gradients and edges, on the central patch of at most `NOISE_PATCH` pixels a side."""
    width, height = image.size
    patch_width, patch_height = min(width, NOISE_PATCH), min(height, NOISE_PATCH)
    if patch_width < 3 or patch_height < 3:
        return 0.0
    left, top = (width - patch_width) // 2, (height - patch_height) // 2
    # int16 holds every intermediate (|response| <= 16 x 255) at a third of int32's time.
    patch = image.crop((left, top, left + patch_width, top + patch_height)).convert("L")
    grey = np.asarray(patch).astype(np.int16)
    # The mask [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] is the outer product of [1, -2, 1] with itself: two passes.
    rows = grey[:-2] - 2 * grey[1:-1] + grey[2:]
    response = rows[:, :-2] - 2 * rows[:, 1:-1] + rows[:, 2:]
    return float(math.sqrt(math.pi / 2) * np.abs(response).sum(dtype=np.int64) / (6 * response.size))


# Paeth's median-of-nine sorting network ("Median finding on a 3x3 grid", Graphics Gems, 1990): 19 compare-exchanges
# after which position 4 holds the median.
MEDIAN_OF_NINE = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
                  (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def median_filtered(image: Image.Image) -> Image.Image:
    """Each channel's 3x3 median, edges replicated: the same pixels as Pillow's `ImageFilter.MedianFilter(3)`, 20x
    faster (3 ms against 70 ms for 500x375; Pillow ranks every neighbourhood, this runs the network on whole arrays)."""
    pixels = np.asarray(image)
    padded = np.pad(pixels, ((1, 1), (1, 1)) + ((0, 0),) * (pixels.ndim - 2), mode="edge")
    height, width = pixels.shape[:2]
    values = [padded[row:row + height, column:column + width] for row in range(3) for column in range(3)]
    for low, high in MEDIAN_OF_NINE:
        values[low], values[high] = np.minimum(values[low], values[high]), np.maximum(values[low], values[high])
    return Image.fromarray(np.ascontiguousarray(values[4]), image.mode)


def denoised(image: Image.Image, above: float | None) -> Image.Image:
    """The photo through a 3x3 median filter when its estimated noise is above `above` (see `DENOISE_ABOVE`)."""
    if above is not None and noise_level(image) > above:
        return median_filtered(image)
    return image


class EvalTransform:
    """Denoise a noisy photo (`denoised`), resize the shorter side to `resize_size` (antialiased), centre-crop
    `input_size`, scale to [0, 1], normalise; returns a float32 NumPy array [3, input_size, input_size] (the
    training layer's datasets turn it into a tensor; prediction feeds it to ONNX Runtime as it is).

    Written for speed, because it runs once per image in prediction and feature extraction: only the source region
    that lands in the crop is resampled (PIL's `box`; the same sampling grid as resizing the whole image and then
    cropping), and the uint8 pixels are transposed to channels-first before the float conversion (about 5x cheaper
    than converting first). 2.2x faster than resize-crop-convert for 200x200 photos, same values to 1e-6.
    """

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess
        self.resample = Image.Resampling.BICUBIC if preprocess.interpolation == "bicubic" else Image.Resampling.BILINEAR
        std = np.asarray(preprocess.std, dtype=np.float32)
        self.scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
        self.offset = (np.asarray(preprocess.mean, dtype=np.float32) / std).reshape(3, 1, 1)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the source image's pixels (floats) of the square the model sees."""
        size, resize = self.preprocess.input_size, self.preprocess.resize_size
        scale = resize / min(width, height)
        resized_width, resized_height = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (resized_width - size) // 2, (resized_height - size) // 2
        x_scale, y_scale = resized_width / width, resized_height / height
        return left / x_scale, top / y_scale, (left + size) / x_scale, (top + size) / y_scale

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.array(image)

    def array(self, image: Image.Image) -> np.ndarray:
        """The model's input for one RGB image: float32 [3, input_size, input_size]."""
        size = self.preprocess.input_size
        image = denoised(image, self.preprocess.denoise_above)
        box = self.crop_box(*image.size)
        if box[2] - box[0] == size and box[3] - box[1] == size:  # no resizing: a plain crop
            image = image.crop(tuple(int(v) for v in box))
        else:
            # Resampling just the crop's box (float corners) gives the crop directly.
            image = image.resize((size, size), self.resample, box=box, reducing_gap=None)
        channels_first = np.asarray(image).transpose(2, 0, 1).astype(np.float32)
        channels_first *= self.scale
        channels_first -= self.offset
        return channels_first


def eval_transform(preprocess: Preprocess) -> EvalTransform:
    """Denoise a noisy photo, resize the shorter side, centre-crop, normalise."""
    return EvalTransform(preprocess)
