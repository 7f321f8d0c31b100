"""The batch size is measured per machine and model, kept in the cache, and forced by an option (issue 24)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catdog.runtime import batch_size as batch_size_module
from catdog.runtime.batch_size import CACHE_FILE, UNMEASURED_BATCH_SIZE, choose_batch_size, machine_fingerprint


class FakeNetwork:
    """A network whose cost per batch is `overhead + per_image * n`, where past `cache_limit` images each image
    costs fifteen times as much (activations outgrowing the caches): its fastest batch size is `cache_limit`, by a
    wide margin (a fixed cost per call makes smaller batches slower, the caches larger ones)."""

    def __init__(self, cache_limit: int = 8):
        self.calls: list[int] = []
        self.cache_limit = cache_limit

    def __call__(self, images: np.ndarray) -> None:
        self.calls.append(len(images))
        import time

        per_image = 0.0002 if len(images) <= self.cache_limit else 0.003
        time.sleep(0.004 + per_image * len(images))


KEY = {"model": "fake", "input": 8, "outputs": ["logits"], "threads": 2}


def test_the_fastest_size_is_measured_once_then_read_back(tmp_path):
    network = FakeNetwork(cache_limit=8)
    first = choose_batch_size(network, (3, 8, 8), KEY, images=None, cache_dir=tmp_path)
    assert first.source == "measured" and first.batch_size == 8, first
    assert set(first.rates) >= {1, 2, 4, 8, 16} and max(first.rates, key=first.rates.get) == 8
    stored = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = stored.values()
    assert entry["batch_size"] == 8 and entry["network"] == KEY and entry["machine"] == machine_fingerprint("cpu")
    network.calls.clear()
    again = choose_batch_size(network, (3, 8, 8), KEY, images=10, cache_dir=tmp_path)
    assert (again.batch_size, again.source) == (8, "cached") and network.calls == []  # no second measurement
    assert "batch size 8 (cached on this machine" in again.describe()


def test_another_machine_or_another_network_measures_again(tmp_path, monkeypatch):
    choose_batch_size(FakeNetwork(cache_limit=8), (3, 8, 8), KEY, cache_dir=tmp_path)
    other_machine = {**machine_fingerprint("cpu"), "cpu": "another processor", "flags": ["avx2"]}
    monkeypatch.setattr(batch_size_module, "machine_fingerprint", lambda device="cpu": other_machine)
    elsewhere = choose_batch_size(FakeNetwork(cache_limit=2), (3, 8, 8), KEY, cache_dir=tmp_path)
    assert (elsewhere.source, elsewhere.batch_size) == ("measured", 2)
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2  # both machines' choices are kept
    monkeypatch.undo()
    other_network = choose_batch_size(FakeNetwork(cache_limit=4), (3, 8, 8), {**KEY, "input": 16}, cache_dir=tmp_path)
    assert (other_network.source, other_network.batch_size) == ("measured", 4)
    assert choose_batch_size(FakeNetwork(), (3, 8, 8), KEY, cache_dir=tmp_path).batch_size == 8  # this one still


def test_an_option_forces_the_size_and_a_short_job_does_not_measure(tmp_path):
    network = FakeNetwork()
    forced = choose_batch_size(network, (3, 8, 8), KEY, images=10_000, forced=3, cache_dir=tmp_path)
    assert (forced.batch_size, forced.source) == (3, "forced")
    short = choose_batch_size(network, (3, 8, 8), KEY, images=12, cache_dir=tmp_path)
    assert (short.batch_size, short.source) == (UNMEASURED_BATCH_SIZE["cpu"], "default")
    assert network.calls == [] and not (tmp_path / CACHE_FILE).exists()
    on_gpu = choose_batch_size(network, (3, 8, 8), KEY, images=12, device="cuda:0", cache_dir=tmp_path)
    assert on_gpu.batch_size == UNMEASURED_BATCH_SIZE["cuda"]


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"x": {"batch_size": "eight"}}'])
def test_an_unreadable_cache_file_is_measured_over(tmp_path, content):
    (tmp_path / CACHE_FILE).write_text(content)
    choice = choose_batch_size(FakeNetwork(cache_limit=4), (3, 8, 8), KEY, cache_dir=tmp_path)
    assert (choice.source, choice.batch_size) == ("measured", 4)
    assert isinstance(json.loads((tmp_path / CACHE_FILE).read_text()), dict)


def test_predict_uses_and_reports_the_measured_size(served_run, tmp_path):
    from conftest import colour_image

    from catdog.runtime.config import PredictConfig
    from catdog.runtime.model_file import load_model_file
    from catdog.runtime.predict import run_predict

    predictor = load_model_file(served_run[1])
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(6):
        colour_image(index % 2, index).save(photos / f"{index}.png")
    seen = []
    original = predictor.network.run
    predictor.network.run = lambda images, outputs=("logits",): (seen.append(len(images)), original(images, outputs))[1]
    messages = []
    config = PredictConfig(paths=[str(photos)], output=str(tmp_path / "p.csv"), progress=False, tta=False,
                           cache_dir=str(tmp_path / "cache"))
    assert run_predict(config, predictor, messages.append) == 0
    assert any("batch size 4 (default)" in message for message in messages), messages  # 6 photos: not measured
    assert seen == [4, 2]
    choose_batch_size(lambda images: None, (3, 32, 32), {}, cache_dir=tmp_path / "cache")  # another network's entry
    chosen = predictor.batch_size(10_000, cache_dir=tmp_path / "cache")
    assert chosen.source == "measured" and chosen.batch_size in chosen.rates
    seen.clear()
    messages.clear()
    assert run_predict(config, predictor, messages.append) == 0
    assert any(f"batch size {chosen.batch_size} (cached on this machine" in message for message in messages), messages
    assert seen[0] == min(6, chosen.batch_size)
