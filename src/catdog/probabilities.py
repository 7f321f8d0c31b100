"""From a network's outputs to the answers a user sees: temperature-scaled probabilities, the rule that decides
which photos also get their mirror image, and the out-of-distribution threshold. Runtime layer (NumPy only): `catdog.predict` applies these rules to every
photo, and training chooses their thresholds on the validation split with the same functions, so the two can never
disagree.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


MIRROR_THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
# Bounds on the validation split for the cheaper scheme against averaging every photo: no lower accuracy, and a
# quarter of the log loss the issue allows (0.002), leaving room for photos the validation split did not show.
MIRROR_LOG_LOSS_MARGIN = 0.0005
MIRROR_MIN_VALIDATION_IMAGES = 200  # fewer: the choice would be noise, so every photo gets the mirror view


def choose_mirror_threshold(view_logits: np.ndarray, labels: np.ndarray, temperature: float,
                            log: Callable[[str], None] = print) -> float | None:
    """The lowest first-view confidence threshold below which adding the mirror view keeps the validation accuracy
    and log loss of averaging every photo with its mirror image. view_logits: [images, 2 (original, mirror),
    classes]. Thresholds are tried from the most cautious down, and the search stops at the first that fails, so
    every threshold above the chosen one holds too. None when the split is too small or none holds."""
    if len(labels) < MIRROR_MIN_VALIDATION_IMAGES:
        return None
    everything = softmax(view_logits.mean(axis=1) / temperature)
    first_view = softmax(view_logits[:, 0] / temperature)

    def accuracy_and_log_loss(probabilities: np.ndarray) -> tuple[float, float]:
        picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-15, 1.0)
        return float((probabilities.argmax(axis=1) == labels).mean()), float(-np.log(picked).mean())

    reference_accuracy, reference_log_loss = accuracy_and_log_loss(everything)
    chosen, share = None, 1.0
    for threshold in sorted(MIRROR_THRESHOLDS, reverse=True):
        unsure = first_view.max(axis=1) < threshold
        accuracy, log_loss = accuracy_and_log_loss(np.where(unsure[:, None], everything, first_view))
        if accuracy < reference_accuracy or log_loss > reference_log_loss + MIRROR_LOG_LOSS_MARGIN:
            break
        chosen, share = threshold, float(unsure.mean())
    if chosen is None:
        log("mirror view: every photo (no cheaper threshold held on the validation split)")
    else:
        log(f"mirror view: only for photos below {chosen} first-view confidence ({share:.1%} of the validation photos), "
            "the accuracy and log loss of averaging every photo held on the validation split")
    return chosen


def threshold_keeping(validation_scores, keep: float) -> float:
    """The out-of-distribution score at or below which a share `keep` of the validation photos lies.

    Halfway between the last kept photo's score and the next one up, not on a photo's own score: the exported file
    computes the score in float32, and a photo sitting exactly on the line could then fall either side of it (it
    did: one of 200 refused in training, two through the ONNX file)."""
    scores = np.sort(np.asarray(validation_scores, dtype=np.float64))
    if not len(scores):
        raise ValueError("no validation scores to choose an out-of-distribution threshold on")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"the share of validation photos to keep must be in (0, 1], got {keep}")
    last_kept = int(np.ceil(keep * (len(scores) - 1)))  # np.quantile's "higher" position
    if last_kept + 1 < len(scores):
        return float((scores[last_kept] + scores[last_kept + 1]) / 2)
    return float(scores[-1] + max(1e-3, 1e-3 * abs(scores[-1])))


def uses_mirror_view(first_view_probabilities: np.ndarray, tta: bool | None, validated_with_mirror: bool,
                     mirror_below: float | None) -> np.ndarray:
    """Which photos (a boolean per row) also get their mirror image. tta=True: all; False: none; None (the
    default): as the run was validated: none without mirror averaging; with it, the photos whose first-view
    confidence is below the run's threshold (`mirror_below`, chosen on the validation split by
    `choose_mirror_threshold`), or all without one."""
    count = len(first_view_probabilities)
    if tta is not None:
        return np.full(count, bool(tta))
    if not validated_with_mirror:
        return np.zeros(count, dtype=bool)
    if mirror_below is None:
        return np.ones(count, dtype=bool)
    return first_view_probabilities.max(axis=1) < mirror_below

