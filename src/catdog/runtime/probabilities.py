"""From a network's outputs to the answers a user sees: temperature-scaled probabilities, the rule that decides
which photos also get their mirror image, which are checked for a quarter turn, and the out-of-distribution
threshold. Runtime layer (NumPy only): `catdog.runtime.predict` applies these rules to every
photo, and training chooses their thresholds on the validation split with the same functions, so the two can never
disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis (classes), for [N, classes] or [N, views, classes]."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


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


# Why a photo is "neither" (predict's `refused_by` column, serve's field of the same name).
REFUSED_UNLIKE = "unlike the training photos"
REFUSED_TAUGHT = "like a taught neither example"


def taught_advantage(ood_scores, neither_distances) -> np.ndarray:
    """How much nearer a photo is to the taught "neither" examples (`catdog train --neither`) than to the training
    photos: its out-of-distribution score (the distance to the training photos) minus its distance to the
    taught examples, both from the exported file. Above the run's margin the photo is refused."""
    return np.asarray(ood_scores, dtype=np.float64) - np.asarray(neither_distances, dtype=np.float64)


def taught_refusals(ood_scores, neither_distances, margin: float, neither_scores=None,
                    threshold: float | None = None) -> np.ndarray:
    """Where the taught examples refuse a photo: nearer them than the training photos by more than `margin`, or
    (with the run's head of the examples, `neither_scores`) scored above its `threshold`."""
    refused = taught_advantage(ood_scores, neither_distances) > margin
    if neither_scores is not None and threshold is not None:
        refused = refused | (np.asarray(neither_scores, dtype=np.float64) > threshold)
    return refused


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



# The orientation check. A photo turned a quarter without EXIF (a scan, a screenshot, an edited or re-saved photo)
# was the worst damage measured for the default run (92.5% right, against 99.4% upright): the network's features
# of a sideways cat are not those of a cat. A turned photo also looks unlike the training photos, so the
# out-of-distribution score finds it, and the score tells upright from upside down, which the turn back must choose
# between (pooled features cannot tell a quarter turn one way from the other). Only photos unlike the validation
# photos (a score above their 95th percentile), yet not so unlike them that they are refused as "neither" (whatever
# their class, and the check would let some through: a turned car can look more like a pet than the car does), and
# not sure (a first-view confidence below 0.99) are checked, turned a quarter each way: about 2% of clean photos,
# so about 4% more network passes. The out-of-distribution score and decision stay those of the photo as it came.
# A turn is taken only when it is surer and scores lower by a margin: half the validation scores' spread between
# their median and 95th percentile (0.056 for the default run), so the rule scales with any backbone's scores.
# Without the margin, blurred, noisy and screenshot photos were sometimes turned wrongly and confidently (their
# log loss up to 1.8x); with it no kind of damage got worse by more than a photo of the 1,200, and sideways photos
# went from 92.5% to about 96% (BENCHMARKS.md, "Damaged photos").
ORIENTATION_CHECK_QUANTILE = 0.95
ORIENTATION_CHECK_BELOW_CONFIDENCE = 0.99
ORIENTATION_MARGIN_OF_SPREAD = 0.5
QUARTER_TURNS = (1, 3)  # rot90's k (NumPy and PyTorch alike): a quarter turn counter-clockwise, and clockwise


@dataclass(frozen=True)
class OrientationCheck:
    """Which photos are also read turned a quarter each way, and when a turn is taken (see the notes above)."""

    check_above: float  # out-of-distribution score above which an unsure photo is checked
    refused_above: float  # the run's out-of-distribution threshold: photos above it are "neither", not checked
    margin: float  # how much lower a turned view's score must be than the photo's own

    @classmethod
    def from_validation_scores(cls, validation_scores, ood_threshold: float | None) -> "OrientationCheck | None":
        """The check for a run from its validation photos' scores and its threshold; None without them."""
        if validation_scores is None or len(validation_scores) < 2 or ood_threshold is None:
            return None
        median, high = np.quantile(np.asarray(validation_scores, dtype=np.float64), [0.5, ORIENTATION_CHECK_QUANTILE])
        return cls(float(high), float(ood_threshold), float(ORIENTATION_MARGIN_OF_SPREAD * (high - median)))

    def needs_check(self, first_view_probabilities: np.ndarray, ood_scores: np.ndarray) -> np.ndarray:
        """Which photos (a boolean per row) are also scored turned a quarter each way."""
        scores = np.asarray(ood_scores)
        return ((scores > self.check_above) & (scores <= self.refused_above)
                & (first_view_probabilities.max(axis=-1) < ORIENTATION_CHECK_BELOW_CONFIDENCE))

    def choose_turns(self, probabilities: np.ndarray, ood_scores: np.ndarray, turned_probabilities: np.ndarray,
                     turned_scores: np.ndarray) -> np.ndarray:
        """For each checked photo, the position in QUARTER_TURNS of the turn to read it in, or -1 to keep it as it
        is. probabilities [N, classes] and ood_scores [N] of the photos as they are; turned_probabilities [N, turns,
        classes] and turned_scores [N, turns] of their turned views. The turn must be the one most like the training
        photos, by the margin, and surer: a wrong orientation is often confidently wrong."""
        rows = np.arange(len(ood_scores))
        best = np.asarray(turned_scores).argmin(axis=1)
        better = ((turned_scores[rows, best] < np.asarray(ood_scores) - self.margin)
                  & (turned_probabilities[rows, best].max(axis=-1) > probabilities.max(axis=-1)))
        return np.where(better, best, -1)

    def turns_to_take(self, logits: np.ndarray, ood_scores: np.ndarray, temperature: float,
                      turned_outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
        """The whole check on first-view logits [N, classes] and scores [N]: (rows, ks, logits) of the photos to read
        turned, their rot90 k and their turned view's logits [len(rows), classes]. turned_outputs(checked rows) gives
        those photos' turned views' logits [R, turns, classes] and scores [R, turns], in QUARTER_TURNS' order; it is
        called only when some photo needs the check. The predictor runs its network there, evaluation reads cached
        features: the rule is this one function for both."""
        probabilities = softmax(logits / temperature)
        rows = np.flatnonzero(self.needs_check(probabilities, ood_scores))
        if not len(rows):
            return rows, rows, logits[:0]
        turned_logits, turned_scores = turned_outputs(rows)
        choice = self.choose_turns(probabilities[rows], np.asarray(ood_scores)[rows],
                                   softmax(turned_logits / temperature), turned_scores)
        taken = np.flatnonzero(choice >= 0)
        return rows[taken], np.asarray(QUARTER_TURNS)[choice[taken]], turned_logits[taken, choice[taken]]
