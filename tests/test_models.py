"""Each model's forward pass, the offline EfficientNet-Lite weight mapping checked on real photos, and timm's zoo:
any timm name builds, its preprocessing is its own, its weights come from the Hub cache, offline fails fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from catdog.training.models import (
    IMAGENET_CAT_CLASSES,
    IMAGENET_DOG_CLASSES,
    MODEL_SPECS,
    PretrainedWeightsUnavailable,
    create_model,
    create_zero_training_model,
    get_model_spec,
    load_efficientnet_lite_imagenet,
)
from catdog.runtime.transforms import eval_transform


@pytest.mark.parametrize("name", list(MODEL_SPECS))
@pytest.mark.parametrize("size", [64, 97])
def test_forward_pass_any_input_size(name, size):
    model = create_model(name, num_classes=3, pretrained=False).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="efficientnet_lite0.*simple_cnn"):
        get_model_spec("vgg99")


def test_frozen_backbone_has_no_trainable_parameters_and_keeps_batchnorm_statistics():
    model = create_model("resnet18", num_classes=2, pretrained=False, freeze_backbone=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    model.train()
    assert not model.backbone.training and model.head.training


def test_resnet18_without_cached_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="--no-pretrained"):
        create_model("resnet18", 2, pretrained=True)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_classify_real_photos_as_imagenet_cats_and_dogs(name, shared_data):
    """The position-based key mapping is right only if ImageNet predictions on real photos are right."""
    model = load_efficientnet_lite_imagenet(name).eval()
    transform = eval_transform(get_model_spec(name).preprocess)
    from catdog.runtime.images import load_image

    paths = [shared_data / "train" / f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(1001, 1021)]
    batch = torch.from_numpy(np.stack([transform(load_image(p)) for p in paths]))  # the transform gives NumPy arrays
    with torch.inference_mode():
        probabilities = model(batch).softmax(1)
    top1 = probabilities.argmax(1).tolist()
    cats = sum(c in IMAGENET_CAT_CLASSES for c in top1[:20])
    dogs = sum(c in IMAGENET_DOG_CLASSES for c in top1[20:])
    # Random weights (or a wrong mapping) put ~0 of 20 in these class ranges; the right mapping gets most.
    assert cats >= 14 and dogs >= 16, (cats, dogs)
    # 5 cat classes of 1000: a uniform (broken) model gives 0.005; the real ones put 20-45% there on these squashed 200 px photos.
    assert probabilities[:20, list(IMAGENET_CAT_CLASSES)].sum(1).mean() > 0.15


def test_zero_training_model_separates_cats_from_dogs(shared_data):
    model, preprocess = create_zero_training_model()
    transform = eval_transform(preprocess)
    from catdog.runtime.images import load_image

    paths = [shared_data / "train" / f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(1100, 1140)]
    with torch.inference_mode():
        probabilities = model(torch.from_numpy(np.stack([transform(load_image(p)) for p in paths]))).softmax(1)
    predicted = probabilities.argmax(1)
    # Chance is 50%; on all 6,000 shared photos this model scores 98.9% (catdog 0.4's summed classes: 89.6%, with
    # every miss a cat called a dog), so on these 80 more than 4 misses, or more than 2 cats called dogs, means it broke.
    truth = torch.tensor([0] * 40 + [1] * 40)
    assert (predicted == truth).float().mean() >= 0.95
    assert ((predicted != truth) & (truth == 0)).sum() <= 2


# ---------------------------------------------------------------- timm's model zoo, offline

TIMM_TEST_MODEL = "test_convnext.r160_in1k"  # timm's 0.3M-parameter test network: 160 px, mean 0.5, bicubic


def put_in_hub_cache(cache: Path, name: str) -> dict[str, torch.Tensor]:
    """Write weights for timm model `name` where huggingface_hub's cache keeps its repository's model.safetensors."""
    import timm
    from safetensors.torch import save_file

    repo = cache / f"models--timm--{name}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = timm.create_model(name, pretrained=False).state_dict()
    save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_tiny", "resnet50.a1_in1k"])
def test_any_timm_model_builds_without_weights(name):
    import timm

    model = create_model(name, num_classes=2, pretrained=False).eval()
    with torch.inference_mode():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 2)
    assert model.feature_dim == timm.create_model(name, pretrained=False).num_features  # 768 and 2048


def test_timm_preprocessing_is_the_models_own_data_config():
    import timm
    from timm.data import resolve_model_data_config

    for name in (TIMM_TEST_MODEL, "resnet50.a1_in1k"):
        data_config = resolve_model_data_config(timm.create_model(name, pretrained=False))
        preprocess = get_model_spec(name).preprocess
        assert preprocess.input_size == data_config["input_size"][-1]
        assert preprocess.crop_fraction == pytest.approx(data_config["crop_pct"])
        assert preprocess.mean == pytest.approx(data_config["mean"]) and preprocess.std == pytest.approx(data_config["std"])
        assert preprocess.interpolation == data_config["interpolation"] == "bicubic"


def test_missing_timm_weights_fail_fast_offline_naming_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match=f"convnext_tiny.*not in the cache {tmp_path / 'hub'}.*HF_HUB_OFFLINE"):
        create_model("convnext_tiny", 2, pretrained=True)
    assert time.perf_counter() - started < 5


def test_timm_weights_come_from_the_hub_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    weights = put_in_hub_cache(tmp_path / "hub", TIMM_TEST_MODEL)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_model(TIMM_TEST_MODEL, 2, pretrained=True)
    loaded = model.backbone.state_dict()
    assert "head.fc.weight" not in loaded  # the ImageNet classifier is dropped; catdog's head replaces it
    assert all(torch.equal(loaded[key], weights[key]) for key in loaded)


@pytest.mark.slow
def test_train_stores_the_timm_preprocessing_in_meta(tmp_path, monkeypatch):
    """A head run on a timm model, weights from the hub cache (offline): meta.json holds timm's data config."""
    import timm
    from huggingface_hub import constants
    from timm.data import resolve_model_data_config

    from conftest import make_kaggle_folder
    from catdog.training.train import TrainConfig, train

    put_in_hub_cache(tmp_path / "hub", TIMM_TEST_MODEL)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_kaggle_folder(tmp_path / "train", per_class=6)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model=TIMM_TEST_MODEL, strategy="head", epochs=2,
                      progress=False, calibrate=False), log=lambda _: None)
    stored = json.loads((tmp_path / "run" / "meta.json").read_text())["preprocess"]
    data_config = resolve_model_data_config(timm.create_model(TIMM_TEST_MODEL, pretrained=False))
    assert stored["input_size"] == data_config["input_size"][-1] == 160
    assert stored["mean"] == pytest.approx(data_config["mean"]) == [0.5, 0.5, 0.5]
    assert stored["crop_fraction"] == pytest.approx(data_config["crop_pct"])
    assert stored["interpolation"] == data_config["interpolation"]


def test_models_command_lists_offline_models_and_says_how_to_use_others(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from catdog.cli import main

    put_in_hub_cache(tmp_path / "hub", TIMM_TEST_MODEL)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "efficientnet_lite0" in listing and "simple_cnn" in listing
    assert TIMM_TEST_MODEL in listing  # found in the (patched) Hugging Face cache
    assert "--model convnext_tiny" in listing and "HF_HUB_OFFLINE" in listing
