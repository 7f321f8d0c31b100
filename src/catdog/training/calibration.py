"""Calibration: the temperature fitted on the validation split, and how far the probabilities can be trusted.

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted to minimise the validation log
loss: T > 1 softens overconfident probabilities, T < 1 sharpens underconfident ones. It never changes a
prediction, only how sure it claims to be.

The fit is guarded. When no validation image is misclassified with enough margin, the validation log loss keeps
falling as T goes to 0 (every probability goes to 1.0 for the right class), so the log-loss-optimal T on a small
or perfectly separated validation set is near 0: a run on 98 shared photos fitted T = 0.235, reported a
validation log loss of 0.0000 and then predicted 1.000000 for new photos, some of them wrong. A validation set
says little about how sure the model may be on new photos unless it is large and has mistakes to learn that from,
so sharpening (T < 1) is only allowed with at least `SHARPEN_MIN_IMAGES` validation images of which at least
`SHARPEN_MIN_ERRORS` are misclassified, and never below `MIN_TEMPERATURE`; otherwise T is at least 1 (the
network's own probabilities, or softer). The log loss is convex in 1/T, so clamping the unconstrained optimum is
the exact optimum under the constraint.

Expected calibration error (ECE) and the reliability curve use the top-label confidence in equal-width bins
(Guo et al., 2017; 15 bins): ECE is the count-weighted mean gap between the confidence claimed and the accuracy
achieved in each bin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catdog.runtime.files import write_with_atomic
from catdog.training.plotting import headless_pyplot

SHARPEN_MIN_IMAGES = 500
SHARPEN_MIN_ERRORS = 5
MIN_TEMPERATURE = 0.5
MAX_TEMPERATURE = 20.0
RELIABILITY_BINS = 15


def log_loss_optimal_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The unconstrained T minimising the log loss of softmax(logits / T); use `fit_temperature` for the guarded
    one. May be near 0 (separable data) or non-finite (degenerate logits)."""
    logits, labels = logits.detach().clone().float(), labels.detach().clone()  # may come from inference mode
    log_temperature = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp())


def temperature_floor(images: int, errors: int) -> float:
    """The smallest temperature a validation set of this size with this many misclassified images may set."""
    return MIN_TEMPERATURE if images >= SHARPEN_MIN_IMAGES and errors >= SHARPEN_MIN_ERRORS else 1.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The guarded temperature for validation logits (see the module docstring): the log-loss-optimal T, kept
    within [temperature_floor, MAX_TEMPERATURE]; 1.0 when the fit fails."""
    if not len(labels):
        return 1.0
    errors = int((logits.argmax(dim=1) != labels).sum())
    temperature = log_loss_optimal_temperature(logits, labels)
    if not math.isfinite(temperature):
        return 1.0
    return min(max(temperature, temperature_floor(len(labels), errors)), MAX_TEMPERATURE)


def remove_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before temperature scaling, from the scaled ones: softmax(T * log p) is softmax(logits)
    again, because log p is logits / T up to a per-row constant. Classes whose scaled probability underflowed
    to 0 stay 0 (they were far below 1e-38 before too)."""
    with np.errstate(divide="ignore"):
        scores = temperature * np.log(np.asarray(probabilities, dtype=np.float64))
    scores -= scores.max(axis=1, keepdims=True)
    exponentials = np.exp(scores)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


@dataclass
class ReliabilityCurve:
    """Per confidence bin (equal width over [0, 1]; empty bins have count 0 and NaN means)."""

    bin_edges: list[float]
    counts: list[int]
    mean_confidence: list[float]
    accuracy: list[float]
    ece: float

    def to_dict(self) -> dict:
        # NaN is not JSON: empty bins are written as null.
        return {key: [None if isinstance(v, float) and math.isnan(v) else v for v in value] if isinstance(value, list) else value
                for key, value in asdict(self).items()}


def reliability_curve(labels: np.ndarray, probabilities: np.ndarray, bins: int = RELIABILITY_BINS) -> ReliabilityCurve:
    """Top-label confidence against accuracy in `bins` equal-width bins, and the ECE they give."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lower, upper]; a confidence of exactly 0 (impossible for a top label) would go in the first one.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / max(len(labels), 1))
    return ReliabilityCurve(edges.tolist(), counts.tolist(), mean_confidence.tolist(), accuracy.tolist(), ece)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = RELIABILITY_BINS) -> float:
    return reliability_curve(labels, probabilities, bins).ece


def plot_reliability_diagrams(curves: dict[str, ReliabilityCurve], path: Path) -> None:
    """Side-by-side reliability diagrams (e.g. "before temperature", "after temperature (T = 0.90)"): accuracy per
    confidence bin as bars against the diagonal of perfect calibration, the gap shaded, ECE in the title, and the
    share of images per bin underneath (most sit in the top bin for a good model)."""
    plt = headless_pyplot()

    figure, axes = plt.subplots(2, len(curves), figsize=(4.2 * len(curves), 5.4), squeeze=False,
                                gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for column, (title, curve) in enumerate(curves.items()):
        edges = np.array(curve.bin_edges)
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        accuracy = np.nan_to_num(np.array(curve.accuracy, dtype=np.float64))
        confidence = np.array(curve.mean_confidence, dtype=np.float64)
        filled = np.array(curve.counts) > 0
        top = axes[0][column]
        top.bar(centres[filled], accuracy[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        top.bar(centres[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width,
                color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence")
        top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{title}\nECE {curve.ece:.4f}", fontsize=9)
        top.legend(loc="upper left", fontsize=7)
        bottom = axes[1][column]
        counts = np.array(curve.counts)
        bottom.bar(centres, counts / max(counts.sum(), 1), width=width, color="grey", edgecolor="black")
        bottom.set_xlabel("confidence (top class)")
        bottom.set_ylabel("share of images")
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
