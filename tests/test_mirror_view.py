"""The mirror view only where it matters: the threshold chosen on validation logits, and the predictor using it."""

from __future__ import annotations

import numpy as np
import pytest

from catdog.runtime.runs import RunMeta
from catdog.runtime.predict import Predictor
from catdog.runtime.probabilities import MIRROR_MIN_VALIDATION_IMAGES, choose_mirror_threshold, softmax, threshold_keeping
from catdog.runtime.transforms import Preprocess


def validation_logits(count: int, uncertain: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-class logits [count, 2 views, 2]: most photos certain and right in both views; `uncertain` photos are
    wrong (barely) from the first view and right from the mirror view, so only averaging gets them right."""
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 2, count)
    sign = np.where(labels == 1, 1.0, -1.0)
    margin = generator.uniform(8, 12, count)  # confidence > 0.9996 from either view
    first, mirror = sign * margin, sign * (margin + generator.normal(0, 0.3, count))
    first[:uncertain] = -sign[:uncertain] * 0.2
    mirror[:uncertain] = sign[:uncertain] * 3.0
    view_logits = np.stack([np.stack([-first / 2, first / 2], 1), np.stack([-mirror / 2, mirror / 2], 1)], 1)
    return view_logits.astype(np.float32), labels


def test_the_threshold_sends_the_uncertain_photos_to_the_mirror_view():
    view_logits, labels = validation_logits(600, uncertain=12)
    threshold = choose_mirror_threshold(view_logits, labels, temperature=1.0, log=lambda _: None)
    assert threshold is not None
    first_confidence = softmax(view_logits[:, 0]).max(axis=1)
    assert (first_confidence[:12] < threshold).all()  # the photos the mirror view fixes get it
    assert (first_confidence < threshold).mean() < 0.1  # and few others


def test_no_threshold_when_only_averaging_everything_holds():
    view_logits, labels = validation_logits(600, uncertain=0)
    # Every photo is certain and wrong from the first view and right after averaging: any threshold loses accuracy.
    view_logits[:, 0] = -view_logits[:, 0]
    view_logits[:, 1] = view_logits[:, 1] * 3
    assert choose_mirror_threshold(view_logits, labels, temperature=1.0, log=lambda _: None) is None


def test_too_small_a_validation_split_gets_no_threshold():
    view_logits, labels = validation_logits(MIRROR_MIN_VALIDATION_IMAGES - 1, uncertain=5)
    assert choose_mirror_threshold(view_logits, labels, temperature=1.0, log=lambda _: None) is None


class MirrorCountingNetwork:
    """Stands in for an exported model's network (`inference.OnnxNetwork`): logits from the mean of the left and
    right image halves, so the mirror image gives different logits; counts the photos it is run on."""

    backend = "counting"
    outputs = ("logits",)

    def __init__(self):
        self.photos = 0

    def run(self, images, outputs=("logits",)):
        assert tuple(outputs) == ("logits",)
        self.photos += len(images)
        half = images.shape[-1] // 2
        score = images[..., :half].mean(axis=(1, 2, 3)) - images[..., half:].mean(axis=(1, 2, 3))
        return {"logits": np.stack([-score, score], axis=1).astype(np.float32)}


def predictor_with(mirror_below: float | None) -> Predictor:
    meta = RunMeta("test", ["cat", "dog"], Preprocess(16, 1.0), 1.0, "head", True, {}, mirror_below)
    return Predictor(network=MirrorCountingNetwork(), meta=meta)  # the real class around a counting network


def test_the_predictor_runs_the_mirror_view_only_below_the_threshold():
    generator = np.random.default_rng(1)
    images = generator.normal(0, 1, (40, 3, 16, 16)).astype(np.float32)
    images[:30, ..., :8] += 3.0  # 30 photos clearly "dog" from the first view; their mirror images say "cat"
    everything = predictor_with(None).probabilities(images)
    predictor = predictor_with(0.99)
    assert predictor.backend == "counting" and not predictor.has_heatmaps and predictor.class_names == ["cat", "dog"]
    selective = predictor.probabilities(images)
    first_view = softmax(predictor.logits(images))
    unsure = first_view.max(axis=1) < 0.99
    assert 0 < unsure.sum() < 40
    assert predictor.network.photos == 40 + unsure.sum() + 40  # first view, the unsure ones' mirror, the check
    np.testing.assert_allclose(selective[unsure], everything[unsure], atol=1e-6)
    np.testing.assert_allclose(selective[~unsure], first_view[~unsure], atol=1e-6)
    np.testing.assert_allclose(predictor.probabilities(images, tta=True), everything, atol=1e-6)
    np.testing.assert_allclose(predictor.probabilities(images, tta=False), first_view, atol=1e-6)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99, 1.0])
def test_the_out_of_distribution_threshold_keeps_its_share_and_sits_between_photos(keep):
    scores = np.random.default_rng(3).uniform(0.2, 0.9, 200)
    threshold = threshold_keeping(scores, keep)
    kept = scores <= threshold
    assert kept.mean() >= keep and kept.sum() <= np.ceil(keep * 199) + 1
    # No photo on the line: the float32 scores of the exported file make the same decisions.
    assert not np.isclose(scores, threshold, rtol=0, atol=1e-5).any()
    assert ((scores.astype(np.float32) <= np.float32(threshold)) == kept).all()
