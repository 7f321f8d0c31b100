"""Saying "neither": how unlike its training photos a photo is. Training layer (torch, NumPy).

A trained run scores a photo by its distance to the k-th nearest training photo in the network's own feature
space (the pooled vector the head sees, L2-normalised): the deep nearest-neighbour score of Sun et al., "Out-of-
Distribution Detection with Deep Nearest Neighbors" (ICML 2022). It needs no examples of "other" photos and no
class names, so it works for any labelled folder, and a frozen ImageNet backbone's features separate photos of the
training kind from people, objects and scenes by a wide margin. The bank of training vectors ships inside the
exported file (`export.DeployableNetwork` computes the score in its graph), so the file alone gives the score.

The threshold is chosen on the validation split, which the bank never contains: the score below which a share
`keep` of the validation photos falls (99% by default: refusing a real pet photo costs more than letting a rare
stranger through). The validation scores are stored with the run, so predict and serve can move the threshold to
another share (`--ood-keep`) without the training photos.

The built-in zero-training model has no training photos; its score is ImageNet's own: the probability mass its
1000 classes put outside the cat and dog classes (`export._cat_dog_logits_and_jacobian`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

from catdog.runtime.files import atomic_path, write_with_atomic
from catdog.training.plotting import headless_pyplot
from catdog.runtime.probabilities import threshold_keeping
from catdog.runtime.runs import OOD_FILE

# Measured side by side on the shared photos against not-pets (benchmarks/ood_research.py, BENCHMARKS.md "Saying
# neither"): k = 5 beats 1 (noisier) and 10 or 50 (people photos come closer); the whole training set's first views
# as the bank (mirror views add nothing), up to 5,000 photos (12 MB as float16 at 1,280 dimensions): a random
# 2,000-photo bank passed the targets with little margin and refused up to 1.6% of held-out validation photos.
KNN_NEIGHBOUR = 5
KNN_BANK_SIZE = 5000
DEFAULT_KEEP = 0.99
# The bank is compared in its top 256 principal directions (uncentred, so dot products are kept, not distances to a
# mean): a one-photo request reads a 1,280 x 256 projection and a 4,800 x 256 bank, not a 4,800 x 1,280 bank, which
# had cost `catdog serve` 3-5% of its throughput at 1 and 4 clients. The kNN alone, one photo, one thread: 0.96 ms in
# all dimensions, 0.52 ms at 512, 0.29 ms at 256; serve with/without the score is now within the noise between
# rounds (BENCHMARKS.md, "Speed with and without the out-of-distribution score"). What it costs "neither", default
# preset (`benchmarks/ood.py`): AUROC 0.9992 in all dimensions and at 256, 384 and 512; not-pets accepted 0.28% in
# all dimensions, 0.46% at 512, 0.92% at 384, 0.74% at 256 (people 0.80%, 1.33%, 2.67%, 2.13%: a few photos near
# the threshold, within the targets of 1% and 3%); the fast preset unchanged. Centring, or re-normalising after the
# projection, let up to 9% of not-pets through at 128-256 dimensions. A bank of at most 256 photos is projected
# exactly (its vectors lie in the subspace).
KNN_DIMENSIONS = 256


def normalised(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


@dataclass
class KnnScorer:
    """The bank (L2-normalised training vectors, projected: [M, d], float16), the projection ([D, d] float32, the
    bank's top principal directions; None: compared in all D dimensions) and k. score = 1 - the k-th largest
    similarity between the photo's projected unit vector and the bank's (a cosine similarity restricted to the
    bank's main subspace): 0 for a photo like a training photo, up to about 2."""

    bank: np.ndarray
    k: int
    projection: np.ndarray | None = None

    @classmethod
    def fit(cls, train_features: np.ndarray, k: int = KNN_NEIGHBOUR, bank_size: int = KNN_BANK_SIZE,
            dimensions: int = KNN_DIMENSIONS, seed: int = 0) -> "KnnScorer":
        chosen = np.arange(len(train_features))
        if len(chosen) > bank_size:
            chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), bank_size, replace=False))
        unit = normalised(train_features[chosen].astype(np.float32))
        projection = None
        if unit.shape[1] > dimensions:
            # Uncentred principal directions: q . b is kept up to the part of q outside the bank's main subspace.
            directions = np.linalg.svd(unit.astype(np.float64), full_matrices=False)[2][:dimensions]
            projection = np.ascontiguousarray(directions.T, dtype=np.float32)
            unit = unit @ projection
        return cls(unit.astype(np.float16), max(1, min(k, len(unit))), projection)

    def project(self, features: np.ndarray) -> np.ndarray:
        unit = normalised(features.astype(np.float32))
        return unit if self.projection is None else unit @ self.projection

    def scores(self, features: np.ndarray, batch: int = 1024) -> np.ndarray:
        """The score of each row of `features` [N, D], computed as the exported graph does."""
        bank = self.bank.astype(np.float32)
        out = []
        for start in range(0, len(features), batch):
            similarity = self.project(features[start:start + batch]) @ bank.T
            out.append(1.0 - np.partition(similarity, -self.k, axis=1)[:, -self.k])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def scores_and_nearest(self, features: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """`scores`, and the bank row nearest each photo (its most similar vector), as the graph of `nearest_module`
        computes them."""
        bank = self.bank.astype(np.float32)
        scores, nearest = [], []
        for start in range(0, len(features), batch):
            similarity = self.project(features[start:start + batch]) @ bank.T
            scores.append(1.0 - np.partition(similarity, -self.k, axis=1)[:, -self.k])
            nearest.append(similarity.argmax(axis=1))
        if not scores:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        return np.concatenate(scores), np.concatenate(nearest).astype(np.int64)

    def module(self) -> "KnnScore":
        return KnnScore(torch.from_numpy(self.bank), self.k,
                        None if self.projection is None else torch.from_numpy(self.projection))

    def nearest_module(self) -> "KnnNearest":
        return KnnNearest(torch.from_numpy(self.bank), self.k,
                          None if self.projection is None else torch.from_numpy(self.projection))

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"bank": self.bank} if self.projection is None else {"bank": self.bank, "projection": self.projection}
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata={"method": "knn", "k": str(self.k)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KnnScorer":
        with safe_open(str(path), framework="numpy") as handle:  # older runs' banks have no projection
            projection = handle.get_tensor("projection") if "projection" in handle.keys() else None
            return cls(handle.get_tensor("bank"), int(handle.metadata()["k"]), projection)


class KnnScore(nn.Module):
    """The k-th nearest neighbour score in the graph: features [N, D] -> score [N]."""

    def __init__(self, bank: torch.Tensor, k: int, projection: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("bank", bank.to(torch.float16))  # half the file size; computed in float32
        self.register_buffer("projection", None if projection is None else projection.float())
        self.k = k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.projection is not None:
            unit = unit @ self.projection
        similarity = unit @ self.bank.float().t()
        return 1.0 - similarity.topk(self.k, dim=1).values[:, -1]


class KnnNearest(KnnScore):
    """The score and the index of the nearest bank row in the graph: features [N, D] -> (score [N], nearest [N],
    int64). The taught "neither" examples' bank (`neither.py`): the index names the example a photo is like."""

    def forward(self, features: torch.Tensor):
        unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.projection is not None:
            unit = unit @ self.projection
        values, indices = (unit @ self.bank.float().t()).topk(self.k, dim=1)
        return 1.0 - values[:, -1], indices[:, 0]


# Below these, "neither" was measured to be unreliable (benchmarks/ood.py: 800 training and 200 validation photos of
# the shared set let 37-45% of not-pets through; 4,800 and 1,200 let 0.1-0.3% through), so training says so.
SMALL_BANK, SMALL_VALIDATION = 2000, 500


def fit_out_of_distribution(train_features: np.ndarray, val_features: np.ndarray, keep: float, run_dir: Path,
                            seed: int = 0, log=print) -> tuple[float, list[float]]:
    """Fit the scorer on the training vectors, save it in the run (`ood.safetensors`), score the validation photos
    and return (threshold keeping `keep` of them, their sorted scores rounded for meta.json)."""
    scorer = KnnScorer.fit(train_features, seed=seed)
    scorer.save(run_dir / OOD_FILE)
    validation_scores = np.sort(scorer.scores(val_features))
    threshold = threshold_keeping(validation_scores, keep)
    log(f"out-of-distribution: {len(scorer.bank)}-photo bank in {scorer.bank.shape[1]} dimensions, k={scorer.k}; "
        f"threshold {threshold:.4f} keeps "
        f"{(validation_scores <= threshold).mean():.1%} of the validation photos")
    if len(scorer.bank) < SMALL_BANK or len(validation_scores) < SMALL_VALIDATION:
        log(f"warning: \"neither\" rests on {len(scorer.bank)} training and {len(validation_scores)} validation photos; "
            "on the shared Kaggle photos a 1,000-photo data set let about 40% of photos showing neither class through "
            "(under 1% with 6,000; BENCHMARKS.md). Measure it with `catdog evaluate --ood-data DIR` on photos like "
            "those your users may send, and move the threshold with predict's or serve's --ood-keep")
    return threshold, [round(float(score), 6) for score in validation_scores]


# ---------------------------------------------------------------- measuring it (`catdog evaluate --ood-data DIR`)


@dataclass
class TaughtScores:
    """A run's taught "neither" examples (`neither.py`) as evaluate measures them: the bank's margin and the head's
    threshold, the evaluated photos' and the other photos' distances to the examples and head scores, and the name of
    each other photo's nearest example."""

    margin: float
    threshold: float | None
    examples: int
    validation_distances: np.ndarray
    validation_scores: np.ndarray | None
    other_distances: np.ndarray
    other_scores: np.ndarray | None
    other_nearest: list[str]

    def refusals(self, ood_scores: np.ndarray, other: bool) -> np.ndarray:
        """Where the examples refuse the other photos (`other`) or the evaluated ones, given their ood scores."""
        from catdog.runtime.probabilities import taught_refusals

        distances, scores = ((self.other_distances, self.other_scores) if other
                             else (self.validation_distances, self.validation_scores))
        return taught_refusals(ood_scores, distances, self.margin, scores, self.threshold)


def out_of_distribution_summary(validation_scores: np.ndarray, other_scores: np.ndarray, threshold: float,
                                other_groups: list[str], other_data: str, taught: TaughtScores | None = None) -> dict:
    """How well the score tells the validation photos from the photos of `other_data` (which show none of the
    classes): AUROC (the chance an other photo scores above a validation photo), and at the run's threshold the
    share of validation photos refused and of other photos accepted, overall and per group (sub-folder). With
    `taught` (a run trained with --neither), `taught` also has the figures of the whole rule (the score or the
    taught examples), what the taught examples refused beyond the score, and the examples that refused most."""
    from sklearn.metrics import roc_auc_score  # imported here: scikit-learn costs ~2 s at start-up

    validation_scores, other_scores = np.asarray(validation_scores, float), np.asarray(other_scores, float)
    labels = np.r_[np.zeros(len(validation_scores)), np.ones(len(other_scores))]
    both = np.r_[validation_scores, other_scores]
    auroc = float(roc_auc_score(labels, both)) if len(validation_scores) and len(other_scores) else float("nan")
    groups = {}
    for group in sorted(set(other_groups)):
        scores = other_scores[[i for i, name in enumerate(other_groups) if name == group]]
        groups[group] = {"photos": len(scores), "accepted_share": float((scores <= threshold).mean())}
    summary = {"data": other_data, "threshold": threshold, "auroc": auroc, "validation_photos": len(validation_scores),
               "validation_refused_share": float((validation_scores > threshold).mean()) if len(validation_scores) else 0.0,
               "other_photos": len(other_scores), "other_accepted_share": float((other_scores <= threshold).mean()) if len(other_scores) else 0.0,
               "groups": groups}
    if taught is not None:
        summary["taught"] = taught_summary(validation_scores, other_scores, threshold, other_groups, taught)
    return summary


def share(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else 0.0


def taught_summary(validation_scores: np.ndarray, other_scores: np.ndarray, threshold: float, other_groups: list[str],
                   taught: TaughtScores) -> dict:
    """The whole rule's figures (refused: the score above the threshold, or the taught examples' rule) beside the
    score's: shares accepted and refused, per group, and which taught examples refused the most other photos."""
    from collections import Counter

    validation_taught = taught.refusals(validation_scores, other=False)
    other_taught = taught.refusals(other_scores, other=True)
    validation_refused = validation_taught | (validation_scores > threshold)
    other_accepted = ~other_taught & (other_scores <= threshold)
    groups = {}
    for group in sorted(set(other_groups)):
        members = np.array([name == group for name in other_groups])
        groups[group] = {"photos": int(members.sum()), "accepted_share": share(other_accepted[members]),
                         "refused_by_taught_share": share(other_taught[members]),
                         "accepted_without_taught_share": share(other_scores[members] <= threshold)}
    nearest = Counter(name for name, refused in zip(taught.other_nearest, other_taught) if refused)
    return {"examples": taught.examples, "margin": taught.margin, "threshold": taught.threshold,
            "validation_refused_share": share(validation_refused), "validation_refused_by_taught_share": share(validation_taught),
            "validation_refused_by_taught_only": int((validation_taught & (validation_scores <= threshold)).sum()),
            "other_accepted_share": share(other_accepted), "other_refused_by_taught": int(other_taught.sum()),
            "other_refused_by_taught_only": int((other_taught & (other_scores <= threshold)).sum()),
            "groups": groups, "nearest_examples": [[name, count] for name, count in nearest.most_common(10)]}


def plot_out_of_distribution_scores(validation_scores: np.ndarray, other_scores: np.ndarray, threshold: float,
                                    other_name: str, path: Path) -> None:
    """Histograms of the validation photos' and the other photos' scores, and the threshold between them."""
    plt = headless_pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    both = np.r_[validation_scores, other_scores]
    bins = np.linspace(float(both.min()), float(both.max()), 50) if len(both) else 10
    axes.hist(validation_scores, bins=bins, alpha=0.6, label=f"validation photos ({len(validation_scores)})", color="#2f6fed")
    axes.hist(other_scores, bins=bins, alpha=0.6, label=f"{other_name} ({len(other_scores)})", color="#d9822b")
    axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    axes.set_xlabel("out-of-distribution score (higher: less like the training photos)")
    axes.set_ylabel("photos")
    axes.legend()
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)
