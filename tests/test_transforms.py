"""The evaluation transform against torchvision's reference pipeline, and the training transform's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from catdog.runtime.transforms import DENOISE_ABOVE, Preprocess, eval_transform, median_filtered, noise_level

from catdog.training.augmentation import train_transform


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


def smooth_photo(width: int = 320, height: int = 240) -> np.ndarray:
    """A clean photo's stand-in: smooth shading and a few hard edges, no grain."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 200, y / height * 200, 128 + 60 * np.sin(x / 17.0) * np.cos(y / 23.0)], axis=-1)
    base[(x // 64 + y // 48) % 2 == 0] += 40  # a checkerboard of steps: edges the estimator must not count as noise
    return np.clip(base, 0, 255)


def with_noise(pixels: np.ndarray, sigma: float, seed: int = 0) -> Image.Image:
    noisy = pixels + np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def test_noise_level_reads_the_grain_not_the_edges():
    pixels = smooth_photo()
    assert noise_level(with_noise(pixels, 0)) < 3
    for sigma in (12, 25):
        # Grey conversion averages the channels' independent noise down by about 0.58; the estimate follows sigma.
        estimate = noise_level(with_noise(pixels, sigma))
        assert 0.45 * sigma < estimate < 0.75 * sigma, (sigma, estimate)
    assert noise_level(with_noise(pixels, 25)) > DENOISE_ABOVE > noise_level(with_noise(pixels, 8))
    assert noise_level(Image.new("RGB", (2, 2))) == 0.0  # too small to measure: never denoised


def test_eval_transform_denoises_a_noisy_photo_and_leaves_a_clean_one_alone():
    from PIL import ImageFilter

    pixels = smooth_photo(500, 375)
    plain = Preprocess(300, 0.89)
    assert plain.denoise_above is None  # off unless chosen: the default preset and the built-in model choose it
    denoising = Preprocess(300, 0.89, denoise_above=DENOISE_ABOVE)
    clean, noisy = with_noise(pixels, 2), with_noise(pixels, 30)
    np.testing.assert_array_equal(eval_transform(denoising)(clean), eval_transform(plain)(clean))
    filtered = eval_transform(denoising)(noisy)
    np.testing.assert_array_equal(filtered, eval_transform(plain)(noisy.filter(ImageFilter.MedianFilter(3))))
    # The filter removes grain: the denoised input is closer to the clean photo's than the noisy one is.
    target = eval_transform(plain)(Image.fromarray(pixels.astype(np.uint8)))
    assert np.abs(filtered - target).mean() < 0.6 * np.abs(eval_transform(plain)(noisy) - target).mean()


def test_denoising_travels_in_meta_json_and_older_runs_keep_their_preprocessing():
    preprocess = Preprocess(300, 0.89, denoise_above=12.5)
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess
    older = Preprocess(300, 0.89, denoise_above=None).to_dict()
    assert "denoise_above" not in older  # written as before the field, so feature-cache keys of older runs still match
    assert Preprocess.from_dict(older).denoise_above is None
    with pytest.raises(ValueError, match="denoise_above"):
        Preprocess(300, 0.89, denoise_above=0)


@pytest.mark.parametrize("shape", [(375, 500, 3), (7, 5, 3), (3, 3, 3), (1, 4, 3), (2, 1, 3), (48, 64)])
def test_median_filter_gives_pillows_pixels(shape):
    from PIL import ImageFilter

    image = Image.fromarray(np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8))
    ours = median_filtered(image)
    assert ours.mode == image.mode and ours.size == image.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(image.filter(ImageFilter.MedianFilter(3))))
