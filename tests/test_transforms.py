"""The evaluation transform against torchvision's reference pipeline, and the training transform's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from catdog.transforms import Preprocess, eval_transform

from catdog.augmentation import train_transform


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: enough structure that a one-pixel misalignment would show."""
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    pixels = np.clip(base + generator.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(200, 200), (500, 375), (375, 500), (2000, 1500), (120, 90), (256, 300)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_transform_matches_resize_crop_normalise(size, interpolation):
    from torchvision.transforms import v2

    preprocess = Preprocess(224, 0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation=interpolation)
    image = photo_like(*size)
    mode = v2.InterpolationMode.BICUBIC if interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    reference = v2.Compose([v2.Resize(preprocess.resize_size, interpolation=mode, antialias=True),
                            v2.CenterCrop(preprocess.input_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(preprocess.mean, preprocess.std)])(image)
    ours = torch.from_numpy(eval_transform(preprocess)(image))
    assert ours.shape == reference.shape == (3, 224, 224) and ours.dtype == torch.float32
    difference = (ours - reference).abs()
    # Resampling only the crop box may round a few pixels the other way (one uint8 level = 1/255/std = 0.02 here);
    # a one-pixel misalignment gives mean differences of 0.01 (large photos) to 0.36.
    assert difference.max() < 0.05 and difference.mean() < 1e-3, f"max {difference.max():.4f} mean {difference.mean():.6f}"


def test_eval_transform_of_an_exact_size_image_is_pure_normalisation():
    preprocess = Preprocess(64, 1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = photo_like(64, 64)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    assert torch.allclose(torch.from_numpy(eval_transform(preprocess)(image)), expected, atol=1e-6)


def test_train_transform_gives_the_input_size_and_varies():
    preprocess = Preprocess(96, 0.875)
    transform = train_transform(preprocess)
    image = photo_like(300, 200)
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == second.shape == (3, 96, 96) and first.dtype == torch.float32
    assert not torch.equal(first, second)
