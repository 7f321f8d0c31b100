"""Training-time augmentation (torchvision's v2 transforms). Training layer: imports torch and torchvision."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torchvision.transforms import v2

from catdog.runtime.transforms import Preprocess, denoised


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


def train_transform(preprocess: Preprocess, augmentation: Augmentation = Augmentation()):
    """Denoise a noisy photo as evaluation does (`transforms.denoised`), random resized crop, flip, small rotation,
    colour jitter, normalise."""
    interpolation = v2.InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    steps: list = [
        partial(denoised, above=preprocess.denoise_above),
        v2.PILToTensor(),
        v2.RandomResizedCrop(
            preprocess.input_size,
            scale=augmentation.crop_scale,
            interpolation=interpolation,
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
