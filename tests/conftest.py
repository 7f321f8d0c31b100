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


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its exported model.onnx): a tiny simple_cnn run that tells the two colours apart, trained and
    exported once per session for the serve, explain and browser tests."""
    from catdog.training.export import ExportConfig, run_export
    from catdog.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("served-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CATDOG_CACHE", str(tmp_path_factory.getbasetemp() / "catdog-cache"))
        data = make_kaggle_folder(root / "train", per_class=12)
        train(TrainConfig(data=str(data), out=str(root / "run"), model="simple_cnn", strategy="finetune", epochs=3,
                          batch_size=8, lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0),
              log=lambda _: None)
        model_file = run_export(ExportConfig(run=str(root / "run")), log=lambda _: None)
    assert model_file == root / "run" / "model.onnx" and model_file.is_file()
    return root / "run", model_file
