"""Shared fixtures: tiny generated data sets (most tests) and the shared Kaggle photos (a few, skipped if absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dogs-vs-cats"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own feature/ONNX cache, never the user's ~/.cache."""
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path_factory.getbasetemp() / "catdog-cache"))


def colour_image(label: int, seed: int, size=(64, 48)) -> Image.Image:
    """A noisy image whose dominant colour depends on the label: learnable in a couple of epochs."""
    generator = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), dtype=np.float64)
    base[..., label % 3] = 170
    base[..., (label + 1) % 3] = 40 * (label // 3)
    pixels = np.clip(base + generator.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_kaggle_folder(root: Path, per_class: int = 12, classes=("cat", "dog"), size=(64, 48)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(classes):
        for index in range(per_class):
            colour_image(label, seed=label * 1000 + index, size=size).save(root / f"{name}.{index}.jpg", quality=90)
    return root


def make_class_folders(root: Path, per_class: int = 12, classes=("Cat", "Dog")) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            colour_image(label, seed=label * 1000 + index).save(root / name / f"{index}.jpg")
    return root


@pytest.fixture
def kaggle_data(tmp_path) -> Path:
    return make_kaggle_folder(tmp_path / "train")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"needs the shared Kaggle photos at {SHARED_DATA} (absent on this machine)")
    return SHARED_DATA
