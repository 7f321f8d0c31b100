"""The orientation check: photos that look turned a quarter (no EXIF) read the way up the network reads best.

`probabilities.OrientationCheck` decides which photos are checked and which turn is taken; `Predictor.upright` and
`explain_photo` apply it around a network. A stand-in network that reads a photo well only when its bright half is
at the top shows the whole path without a trained model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catdog.runtime.explain import explain_photo
from catdog.runtime.predict import Predictor
from catdog.runtime.probabilities import ORIENTATION_CHECK_BELOW_CONFIDENCE, OrientationCheck, softmax
from catdog.runtime.runs import RunMeta
from catdog.runtime.transforms import Preprocess

SIZE = 16
VALIDATION_SCORES = list(np.linspace(0.1, 0.42, 101))  # median 0.26, 95th percentile 0.404
THRESHOLD = 0.5
UPRIGHT_SCORE, SIDEWAYS_SCORE, UPSIDE_DOWN_SCORE, STRANGER_SCORE = 0.2, 0.45, 0.48, 0.9


class UprightOnlyNetwork:
    """Stands in for an exported network: sure and right only when a photo's bright half is at the top; a photo
    turned a quarter is read unsurely as the other class and scores between the 95th percentile of the validation
    scores and the threshold; upside down scores higher still; a photo whose blue channel is bright is a stranger
    (far above the threshold) whichever way up. Class evidence: green above red is a dog. Counts the photos run."""

    backend = "stand-in"
    outputs = ("logits", "ood_score", "class_maps")

    def __init__(self):
        self.photos = 0

    def run(self, images, outputs=("logits",)):
        self.photos += len(images)
        half = images.shape[-1] // 2
        grey = images.mean(axis=1)
        vertical = grey[:, :half].mean(axis=(1, 2)) - grey[:, half:].mean(axis=(1, 2))
        horizontal = grey[:, :, :half].mean(axis=(1, 2)) - grey[:, :, half:].mean(axis=(1, 2))
        upright, upside_down = vertical > np.abs(horizontal), -vertical > np.abs(horizontal)
        stranger = images[:, 2].mean(axis=(1, 2)) > images[:, :2].mean(axis=(1, 2, 3)) + 0.5
        evidence = np.sign(images[:, 1].mean(axis=(1, 2)) - images[:, 0].mean(axis=(1, 2)))
        margin = np.where(upright, 8.0, -0.3) * evidence
        logits = np.stack([-margin / 2, margin / 2], axis=1).astype(np.float32)
        scores = np.where(stranger, STRANGER_SCORE,
                          np.where(upright, UPRIGHT_SCORE, np.where(upside_down, UPSIDE_DOWN_SCORE, SIDEWAYS_SCORE)))
        maps = np.repeat(grey[:, None], 2, axis=1)  # where the bright half is, for either class
        return {"logits": logits, "ood_score": scores.astype(np.float32), "class_maps": maps.astype(np.float32)}


def predictor(validation_scores=VALIDATION_SCORES) -> Predictor:
    meta = RunMeta("stand-in", ["cat", "dog"], Preprocess(SIZE, 1.0), 1.0, "head", False, {}, None, "knn", THRESHOLD,
                   0.99, list(validation_scores))
    return Predictor(network=UprightOnlyNetwork(), meta=meta)


def photo_array(dog: bool, turns: int = 0, stranger: bool = False) -> np.ndarray:
    """A preprocessed photo [3, S, S]: bright top half, a class's colour cast, turned by rot90's k `turns`."""
    image = np.full((3, SIZE, SIZE), -1.0, dtype=np.float32)
    image[:, : SIZE // 2] = 1.0
    image[1 if dog else 0] += 0.5
    if stranger:
        image[2] += 3.0
    return np.ascontiguousarray(np.rot90(image, turns, axes=(1, 2)))


def test_the_rule_is_set_by_the_validation_scores_and_the_threshold():
    check = OrientationCheck.from_validation_scores(VALIDATION_SCORES, THRESHOLD)
    assert check.check_above == pytest.approx(0.404) and check.refused_above == THRESHOLD
    assert check.margin == pytest.approx(0.5 * (0.404 - 0.26))
    assert OrientationCheck.from_validation_scores([], THRESHOLD) is None  # a run trained before the scores
    assert OrientationCheck.from_validation_scores(VALIDATION_SCORES, None) is None
    unsure, sure = [0.6, 0.4], [0.995, 0.005]
    probabilities = np.array([unsure, unsure, sure, unsure, unsure])
    scores = np.array([0.45, 0.30, 0.45, 0.55, THRESHOLD])
    # Checked: unsure and between the 95th percentile and the threshold; not the typical, sure or refused photos.
    assert check.needs_check(probabilities, scores).tolist() == [True, False, False, False, True]
    assert sure[0] >= ORIENTATION_CHECK_BELOW_CONFIDENCE


def test_a_turn_is_taken_only_when_it_is_more_typical_by_the_margin_and_surer():
    check = OrientationCheck(check_above=0.4, refused_above=0.5, margin=0.05)
    own = np.array([[0.6, 0.4]] * 4)
    own_scores = np.full(4, 0.45)
    turned = np.array([[[0.99, 0.01], [0.7, 0.3]],  # first turn: typical and sure: taken
                       [[0.7, 0.3], [0.99, 0.01]],  # the second turn is the more typical: taken
                       [[0.99, 0.01], [0.7, 0.3]],  # more typical, but not by the margin: kept as it is
                       [[0.55, 0.45], [0.7, 0.3]]])  # more typical, but less sure: kept as it is
    turned_scores = np.array([[0.2, 0.44], [0.44, 0.3], [0.42, 0.44], [0.2, 0.44]])
    assert check.choose_turns(own, own_scores, turned, turned_scores).tolist() == [0, 1, -1, -1]


def test_a_sideways_photo_is_read_turned_back_and_an_upright_one_costs_nothing():
    images = np.stack([photo_array(True), photo_array(True, 1), photo_array(False, 3), photo_array(False, 1, True)])
    plain = predictor()
    probabilities, scores = plain.predict_batch(images.copy(), check_orientation=False)
    assert plain.network.photos == 4
    assert probabilities[:3].argmax(axis=1).tolist() == [1, 0, 1]  # the sideways dog and cat are read wrongly
    checked = predictor()
    before = images.copy()
    turned_probabilities, turned_scores = checked.predict_batch(images, check_orientation=True)
    assert np.array_equal(images, before)  # the caller's batch is not turned in place
    # Two more passes for each of the two sideways photos; the upright one and the stranger are not checked.
    assert checked.network.photos == 4 + 2 * 2
    assert turned_probabilities[:3].argmax(axis=1).tolist() == [1, 1, 0]
    assert (turned_probabilities[:3].max(axis=1) > 0.99).all()
    assert np.allclose(turned_probabilities[3], probabilities[3])  # a refused stranger keeps its answer
    # The out-of-distribution score and decision are those of the photo as it came.
    assert np.array_equal(turned_scores, scores)
    assert checked.in_distribution(turned_scores).tolist() == [True, True, True, False]


def test_upright_reports_the_turn_it_took():
    images = np.stack([photo_array(False), photo_array(True, 1), photo_array(True, 3)])
    checker = predictor()
    outputs = checker.network.run(images, ("logits", "ood_score"))
    turned, logits, turns = checker.upright(images, outputs["logits"], outputs["ood_score"])
    assert turns.tolist() == [0, 3, 1]  # rot90's k that brings each photo upright
    assert np.array_equal(turned[1], photo_array(True)) and np.array_equal(turned[0], images[0])
    assert softmax(logits).argmax(axis=1).tolist() == [0, 1, 1]


def test_a_run_without_validation_scores_is_not_checked():
    older = predictor(validation_scores=[])
    assert not older.checks_orientation
    older.predict_batch(np.stack([photo_array(True, 1)]), check_orientation=True)
    assert older.network.photos == 1


def test_explain_reads_the_photo_turned_back_and_lays_the_map_on_the_photo_as_it_is():
    upright = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    upright[: SIZE // 2] = 220
    upright[..., 1] += 30  # a dog
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # bright half on the left
    explanation = explain_photo(predictor(), sideways, check_orientation=True)
    assert explanation.label == "dog" and explanation.confidence > 0.99
    heatmap = explanation.heatmap
    assert heatmap[:, : SIZE // 2].mean() > heatmap[:, SIZE // 2 :].mean() + 0.5  # over the photo's bright half
    unchecked = explain_photo(predictor(), sideways, check_orientation=False)
    assert unchecked.label == "cat" and unchecked.confidence < 0.99
