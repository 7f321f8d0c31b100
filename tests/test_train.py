"""Training on tiny generated images: both strategies, the run directory contract, resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import make_kaggle_folder

from catdog.training.checkpoint import load_model, load_training_state

from catdog.training.ood import OOD_FILE, fit_out_of_distribution
from catdog.runtime.runs import LAST_CHECKPOINT_FILE
from catdog.training.train import TrainConfig, train
from catdog.training.strategy import resolve_preprocess, resolve_strategy, strategy_defaults
from catdog.training.loop import build_scheduler
from catdog.runtime.transforms import DENOISE_ABOVE


def quiet(_message: str) -> None:
    pass


def small_config(data, out, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), model="simple_cnn", strategy="finetune", epochs=2, batch_size=8,
                  lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def test_two_epoch_finetune_writes_the_whole_run_directory(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=16)
    (data / "cat.999.jpg").write_bytes(b"")  # one bad file must not stop training
    result = train(small_config(data, tmp_path / "run"), log=quiet)
    run = tmp_path / "run"
    for name in ("model.safetensors", "meta.json", "config.json", "history.csv", "split.json", LAST_CHECKPOINT_FILE):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["class_names"] == ["cat", "dog"] and meta["preprocess"]["input_size"] == 32
    assert meta["model_name"] == "simple_cnn" and meta["temperature"] > 0
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert set(history[0]) >= {"train_loss", "val_loss", "val_accuracy", "learning_rate", "seconds", "images_per_second"}
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"]) and len(split["train"]) + len(split["val"]) == 33
    assert [e.path for e in result.skipped] == [str(data / "cat.999.jpg")]
    model, loaded_meta = load_model(run)
    assert loaded_meta.class_names == ["cat", "dog"]
    assert result.meta.metrics["accuracy"] >= 0.75  # colour is easy: two epochs are enough


def test_head_strategy_on_cached_features(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="efficientnet_lite0", strategy="head",
                         epochs=15, num_workers=0, progress=False, image_size=64)
    first = train(config, log=quiet)
    assert first.meta.strategy == "head" and first.meta.metrics["accuracy"] == 1.0
    messages = []
    train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "again")}), log=messages.append)
    assert any("0 computed, 20 from cache" in m for m in messages), messages  # second run reuses the cache
    model, meta = load_model(tmp_path / "run")
    assert meta.model_name == "efficientnet_lite0"
    # Validated with mirror-image averaging, so prediction averages the same way unless told otherwise.
    assert meta.tta is True
    from catdog.training.backends import load_run_predictor, load_torch_predictor

    images = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    torch_predictor = load_torch_predictor(str(tmp_path / "run"), "cpu")
    onnx_predictor = load_run_predictor(str(tmp_path / "run"), "onnxruntime", "cpu")  # exported on first use
    assert (torch_predictor.backend, onnx_predictor.backend) == ("torch", "onnxruntime")
    for predictor in (torch_predictor, onnx_predictor):
        assert predictor.meta.tta is True
        assert np.allclose(predictor.probabilities(images), predictor.probabilities(images, tta=True))
        assert not np.allclose(predictor.probabilities(images), predictor.probabilities(images, tta=False))
    assert np.allclose(torch_predictor.probabilities(images), onnx_predictor.probabilities(images), atol=1e-4)


def test_time_budget_cuts_feature_extraction_and_a_rerun_continues_from_the_cache(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=40)
    common = dict(data=str(data), model="efficientnet_lite0", strategy="head", epochs=3, num_workers=0, progress=False,
                  image_size=64, cache_dir=str(tmp_path / "cache"), feature_batch_size=64)
    messages = []
    # 0.1 min = 6 s: extraction must stop at least 10 s before the end, so that moment has passed at once and only
    # the first batch (64 of the 80 photos, in a seeded random order) is computed; the head trains on those.
    train(TrainConfig(out=str(tmp_path / "cut"), time_budget=0.1, **common), log=messages.append)
    assert any("(64 computed, 0 from cache)" in m for m in messages), messages
    assert any("time budget: 16 of 80 photos not reached" in m for m in messages), messages
    assert (tmp_path / "cut" / "model.safetensors").is_file()
    rerun = []
    train(TrainConfig(out=str(tmp_path / "full"), **common), log=rerun.append)
    assert any("(16 computed, 64 from cache)" in m for m in rerun), rerun
    assert not any("not reached" in m for m in rerun)


def test_resume_continues_to_the_same_result(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=12)
    full = train(small_config(data, tmp_path / "full", epochs=3), log=quiet)
    # Interrupt after one epoch by giving a one-epoch run, then pretend it was meant to be three.
    partial_config = small_config(data, tmp_path / "part", epochs=3)
    partial_config_one = small_config(data, tmp_path / "part", epochs=3, time_budget=1e-9)
    train(partial_config_one, log=quiet)
    state = load_training_state(tmp_path / "part" / LAST_CHECKPOINT_FILE)
    assert state["epoch"] == 0
    config_path = tmp_path / "part" / "config.json"
    saved = json.loads(config_path.read_text())
    saved["time_budget"] = 0.0
    config_path.write_text(json.dumps(saved))
    resumed = train(TrainConfig(resume=str(tmp_path / "part"), progress=False), log=quiet)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    del partial_config


def test_refuses_to_overwrite_an_existing_run(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=6)
    train(small_config(data, tmp_path / "run", epochs=1), log=quiet)
    with pytest.raises(ValueError, match="--resume"):
        train(small_config(data, tmp_path / "run", epochs=1), log=quiet)


def test_config_validation():
    with pytest.raises(ValueError, match="valid models"):
        TrainConfig(data="x", model="nope")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(data="x", val_fraction=1.5)
    with pytest.raises(ValueError, match="--data"):
        TrainConfig()


def test_default_preset_takes_frozen_features_above_the_backbones_own_size():
    default = TrainConfig(data="x")
    assert default.model == "efficientnet_lite2"
    assert resolve_preprocess(default, "head").input_size == 300  # test-resolution effect, see resolve_preprocess
    assert resolve_preprocess(default, "finetune").input_size == 260  # fine-tuning trains at the model's own size
    assert resolve_preprocess(TrainConfig(data="x", preset="fast"), "head").input_size == 224
    # Another model, or an explicit size, is taken as asked.
    assert resolve_preprocess(TrainConfig(data="x", model="efficientnet_lite0"), "head").input_size == 224
    assert resolve_preprocess(TrainConfig(data="x", image_size=128), "head").input_size == 128
    assert resolve_preprocess(TrainConfig(data="x", image_size=128), "head").crop_fraction == 0.89
    # The run's config.json records the size used, so a resumed run keeps it.
    assert strategy_defaults(default, "head").image_size == 300
    assert strategy_defaults(default, "finetune").image_size == 260


def test_auto_strategy_follows_the_device_and_the_data_size():
    auto, cpu, cuda = TrainConfig(data="x"), torch.device("cpu"), torch.device("cuda")
    assert resolve_strategy(auto, cpu, 50_000) == "head"  # fine-tuning on a CPU runs at a few images per second
    assert resolve_strategy(auto, cuda, 1_999) == "head"  # small data: frozen features are as good, in seconds
    assert resolve_strategy(auto, cuda, 2_000) == "finetune"
    assert resolve_strategy(TrainConfig(data="x", pretrained=False), cpu, 100) == "finetune"  # no features to freeze
    assert resolve_strategy(TrainConfig(data="x", strategy="finetune"), cpu, 100) == "finetune"
    with pytest.raises(ValueError, match="pretrained"):
        resolve_strategy(TrainConfig(data="x", strategy="head", pretrained=False), cpu, 100)


def test_cosine_schedule_warms_up_then_decays():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    config = TrainConfig(data="x", epochs=4, warmup_epochs=1, scheduler="cosine")
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[9] <= 1.0 and rates[10] == pytest.approx(1.0, abs=0.01) and rates[-1] < 0.01


@pytest.mark.parametrize(("train_photos", "validation_photos", "warned"), [(800, 200, True), (2400, 600, False)])
def test_a_small_data_set_is_told_that_neither_is_unreliable(tmp_path, train_photos, validation_photos, warned):
    features = np.random.default_rng(0).normal(size=(train_photos + validation_photos, 16)).astype(np.float32)
    lines: list[str] = []
    threshold, scores = fit_out_of_distribution(features[:train_photos], features[train_photos:], 0.99, tmp_path, log=lines.append)
    assert (tmp_path / OOD_FILE).is_file() and len(scores) == validation_photos
    assert np.mean(np.array(scores) <= threshold) >= 0.99
    assert any(line.startswith('warning: "neither" rests on') for line in lines) == warned


def test_the_default_preset_denoises_the_fast_one_not_and_zero_turns_it_off():
    assert resolve_preprocess(TrainConfig(data="photos"), "head").denoise_above is None  # off by default (issue 24)
    assert resolve_preprocess(TrainConfig(data="photos", denoise_above=DENOISE_ABOVE), "head").denoise_above == DENOISE_ABOVE
    assert resolve_preprocess(TrainConfig(data="photos", preset="fast"), "head").denoise_above is None
    assert resolve_preprocess(TrainConfig(data="photos", preset="fast", denoise_above=10), "head").denoise_above == 10
    assert resolve_preprocess(TrainConfig(data="photos", model="resnet18"), "head").denoise_above is None  # unmeasured
    assert resolve_preprocess(TrainConfig(data="photos", denoise_above=6.5), "finetune").denoise_above == 6.5
    assert resolve_preprocess(TrainConfig(data="photos", denoise_above=0), "head").denoise_above is None
    with pytest.raises(ValueError, match="denoise_above"):
        TrainConfig(data="photos", denoise_above=-1)
