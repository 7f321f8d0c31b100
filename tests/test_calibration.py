"""Calibration: the guarded temperature fit, ECE and reliability curves, and what evaluate writes about them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_kaggle_folder

from catdog.training.calibration import (
    MIN_TEMPERATURE,
    expected_calibration_error,
    fit_temperature,
    log_loss_optimal_temperature,
    reliability_curve,
    remove_temperature,
)
from catdog.cli import main
from catdog.training.train import TrainConfig, train


def binary_logits(margins: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose right-class margin is `margins` (negative: misclassified)."""
    signed = torch.where(labels == 1, margins, -margins) / 2
    return torch.stack([-signed, signed], dim=1)


def test_a_separable_validation_set_is_never_sharpened():
    # 98 validation images, all right with realistic margins: the log loss keeps falling as T -> 0.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (98,), generator=generator)
    logits = binary_logits(2 + 6 * torch.rand(98, generator=generator), labels)
    assert log_loss_optimal_temperature(logits, labels) < 0.3  # what the unguarded fit would have used
    temperature = fit_temperature(logits, labels)
    assert temperature >= 1.0
    probabilities = torch.softmax(logits / temperature, dim=1)
    assert probabilities.max() < 1.0  # no photo gets a probability of exactly 1.0


def test_a_large_separable_validation_set_is_not_sharpened_either():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (2000,), generator=generator)
    logits = binary_logits(1 + 5 * torch.rand(2000, generator=generator), labels)
    assert fit_temperature(logits, labels) >= 1.0


def test_a_large_underconfident_validation_set_with_errors_is_sharpened_but_not_below_the_floor():
    # Labels drawn from sigmoid(2 z) while the logits say sigmoid(z): the model is underconfident by a factor 2.
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(3000, generator=generator) * 2
    labels = (torch.rand(3000, generator=generator) < torch.sigmoid(2 * scores)).long()
    logits = torch.stack([-scores / 2, scores / 2], dim=1)
    assert int((logits.argmax(1) != labels).sum()) >= 5
    temperature = fit_temperature(logits, labels)
    assert MIN_TEMPERATURE <= temperature < 0.75
    before = torch.nn.functional.cross_entropy(logits, labels)
    after = torch.nn.functional.cross_entropy(logits / temperature, labels)
    assert after < before


def test_temperature_fitting_softens_overconfident_logits():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    clean = torch.where(labels == 1, 1.0, -1.0) + torch.randn(400)
    logits = torch.stack([-clean, clean], 1) * 10  # right most of the time, far too confident
    temperature = fit_temperature(logits, labels)
    assert temperature > 3
    before = torch.nn.functional.cross_entropy(logits, labels)
    after = torch.nn.functional.cross_entropy(logits / temperature, labels)
    assert after < before


def test_ece_and_reliability_curve_on_a_case_with_known_answers():
    labels = np.array([1, 1, 0, 0])
    # Two images at confidence 0.9, both right (gap 0.1); two at 0.6, one right (gap 0.1).
    probabilities = np.array([[0.1, 0.9], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])
    curve = reliability_curve(labels, probabilities, bins=10)
    assert curve.ece == pytest.approx(0.1)
    assert sum(curve.counts) == 4 and curve.counts[8] == 2 and curve.counts[5] == 2
    assert curve.accuracy[8] == pytest.approx(1.0) and curve.accuracy[5] == pytest.approx(0.5)
    assert curve.mean_confidence[8] == pytest.approx(0.9)
    assert json.loads(json.dumps(curve.to_dict()))["accuracy"][0] is None  # empty bins are JSON null


def test_ece_is_small_for_calibrated_and_large_for_overconfident_probabilities():
    generator = np.random.default_rng(0)
    confidence = generator.uniform(0.5, 1.0, 20000)
    right = generator.uniform(size=20000) < confidence
    labels = np.where(right, 1, 0)
    calibrated = np.stack([1 - confidence, confidence], axis=1)
    assert expected_calibration_error(labels, calibrated) < 0.02
    overconfident = np.stack([(1 - confidence) / 4, 1 - (1 - confidence) / 4], axis=1)
    assert expected_calibration_error(labels, overconfident) > 0.15


def test_remove_temperature_recovers_the_probabilities_before_it():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.1, -3.0], [9.0, -9.0, 0.0]])
    for temperature in (0.6, 1.0, 2.5):
        scaled = torch.softmax(logits / temperature, dim=1).numpy()
        np.testing.assert_allclose(remove_temperature(scaled, temperature), torch.softmax(logits, dim=1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_training_and_evaluating_a_separable_run_writes_calibration(tmp_path):
    # Plain colour images: a few epochs separate the validation split completely.
    data = make_kaggle_folder(tmp_path / "train", per_class=14)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="simple_cnn", strategy="finetune", epochs=4,
                         batch_size=8, lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0)
    result = train(config, log=lambda _: None)
    assert result.meta.temperature >= 1.0  # 6 validation images: never sharpened
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "ev"), "--backend", "torch"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["temperature"] == pytest.approx(result.meta.temperature)
    assert 0.0 <= metrics["ece"] <= 1.0 and 0.0 <= metrics["ece_before_temperature"] <= 1.0
    after = metrics["reliability"]["after_temperature"]
    assert sum(after["counts"]) == metrics["count"] and after["ece"] == pytest.approx(metrics["ece"])
    assert (tmp_path / "ev" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
