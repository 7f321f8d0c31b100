"""Preprocessing presets. The settings travel with each model (`models.ModelSpec.preprocess`) and are saved in a
run's `meta.json`, so predict, serve and export always preprocess exactly as training did."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the model's input tensor at evaluation time.

    input_size: side of the square crop the model sees.
    crop_fraction: the image's shorter side is resized to input_size / crop_fraction, then centre-cropped.
    mean, std: per-channel normalisation applied to [0, 1] pixel values.
    interpolation: "bilinear" or "bicubic" resizing.
    """

    input_size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.input_size < 16:
            raise ValueError(f"input_size must be at least 16, got {self.input_size}")
        if not 0.1 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in [0.1, 1], got {self.crop_fraction}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {self.interpolation}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_fraction))

    def to_dict(self) -> dict:
        return {**asdict(self), "resize_size": self.resize_size}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocess":
        return cls(**{key: values[key] for key in ("input_size", "crop_fraction", "mean", "std", "interpolation")})


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation (the tutorial's recipe by default).

    crop_scale: area range of RandomResizedCrop, as fractions of the image.
    flip: probability of a horizontal flip.
    rotation_degrees: maximum rotation either way.
    color_jitter: brightness, contrast, saturation, hue.
    """

    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: float = 0.5
    rotation_degrees: float = 10.0
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.1)


def _interpolation(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode.BICUBIC if name == "bicubic" else v2.InterpolationMode.BILINEAR


def eval_transform(preprocess: Preprocess) -> v2.Compose:
    """Resize the shorter side, centre-crop, normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(preprocess.resize_size, interpolation=_interpolation(preprocess.interpolation), antialias=True),
            v2.CenterCrop(preprocess.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preprocess.mean, preprocess.std),
        ]
    )


def train_transform(preprocess: Preprocess, augmentation: Augmentation = Augmentation()) -> v2.Compose:
    """Random resized crop, flip, small rotation, colour jitter, normalise."""
    steps: list = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(
            preprocess.input_size,
            scale=augmentation.crop_scale,
            interpolation=_interpolation(preprocess.interpolation),
            antialias=True,
        ),
        v2.RandomHorizontalFlip(augmentation.flip),
    ]
    if augmentation.rotation_degrees:
        steps.append(v2.RandomRotation(augmentation.rotation_degrees))
    if any(augmentation.color_jitter):
        steps.append(v2.ColorJitter(*augmentation.color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocess.mean, preprocess.std)]
    return v2.Compose(steps)
