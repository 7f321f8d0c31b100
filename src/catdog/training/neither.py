"""Saying "neither" to what the user showed: `catdog train --neither DIR`. Training layer (NumPy, scikit-learn, torch
for the graph).

The automatic score (`ood.py`: the distance to the training photos) refuses what is far from every training photo:
people, objects, scenes. Animals that look like pets are near them, and only the user can say that they are not
pets (Azure Custom Vision's "Negative" tag). `--neither DIR` (repeatable; any layout, sub-folders searched) gives
such photos. They never become a class of the model and are never counted in its accuracy. The run learns two
things from their features, taken from the same network as the automatic score's bank (the frozen backbone's first
view for the head strategy, the fine-tuned network's for fine-tuning), and keeps both in `neither.safetensors`:

- a head of the examples: a logistic regression of the training photos (label 0) against the examples (label 1) on
  the L2-normalised features, balanced; its decision value is `neither_score`, and its threshold keeps a share
  `--neither-keep` (99.8%) of the validation photos, which no part of the rule was fitted on;
- a k-NN bank of the examples (`ood.KnnScorer`, k = 1, its own top principal directions, float16): the distance to
  the nearest example (`neither_distance`), and which one it is (`nearest_neither`, named in the answers); with a
  margin above every validation photo's, so a copy of an example is refused whatever the head says.

    neither  <=>  ood_score > threshold                          (unlike the training photos: as before)
              or  neither_score > neither_threshold              (the head: like the taught examples)
              or  ood_score - neither_distance > neither_margin  (nearer an example than any validation photo is)

The exported file computes the three outputs in its graph and carries the thresholds and the examples' names in its
metadata, so the file alone decides as the run does. At training time a fifth of the examples (chosen by content
and seed) is held out and scored by a rule fitted on the other four fifths: the estimate is in the log and in
meta.json (`neither_summary.held_out`); the shipped rule is fitted on them all.

Why this rule (benchmarks/neither_research.py on the default preset's cached features, half of each species folder
of the shared not-pets-near taught, the other half measured; BENCHMARKS.md "Teaching neither"): a k-NN bank alone
(the issue's first measurement) refuses the other halves as well (worst species 3.8% accepted at k = 1 and 99.5%
kept), but a species it was never shown much worse: leave-one-species-out 56% of bobcats and 26% of wolves accepted
(k = 3 or 5: 47-50%, 22-25%); the head generalises from the nine other species far better (bobcats 20%, wolves 8%,
mean 4.9% against 12%) at the same cost on pets. Its threshold at 99.8% rather than 99.5%: at 99.5% it refused 1.75%
of the original-size Kaggle photos (the automatic score alone 1.12%), over the 1.5% allowed; at 99.8% 1.25%, the
validation photos 1.00% (alone 0.92%), not-pets accepted unchanged (0.74%), the worst held half 3.8% (hamsters).
C = 1: 0.3 and 3 were within a point on the held halves and on pets (3 a little better on unseen species, bobcats
17%; 1 kept, the more regularised, for users with a few dozen examples). The bank's margin adds no refusal on these folders and costs nothing on pets, but
without it one taught example of 586 was accepted by its own run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

from catdog.runtime.data import DataError, content_digest, describe_left_out, find_image_files, relative_to_root
from catdog.runtime.files import atomic_path
from catdog.runtime.probabilities import taught_advantage, taught_refusals, threshold_keeping
from catdog.runtime.runs import NEITHER_FILE
from catdog.training.ood import KNN_DIMENSIONS, KnnScorer, normalised

# The taught examples' bank: k = 1 (the nearest example: its name is the answer's "why", and a copy of an example is
# refused) and at most this many examples (a seeded sample beyond).
NEITHER_K = 1
NEITHER_BANK_SIZE = 5000
HEAD_C = 1.0  # the head's inverse L2 regularisation (scikit-learn's C)
HEAD_TRAINING_PHOTOS = 20000  # the head sees at most this many training photos (a seeded sample beyond)
BANK_KEEP = 1.0  # the bank's margin keeps every validation photo: it refuses what is nearer an example than any is
HELD_OUT_SHARE = 0.2  # of the taught examples, for the estimate at training time (the bank that ships has all)
MIN_HELD_OUT = 5  # fewer held-out examples than this: no estimate


@dataclass
class NeitherPhotos:
    """The taught examples found under the --neither folders: their files, their names (`<folder>/<path inside
    it>`, what an answer shows) and content digests; what was left out and why."""

    folders: list[str]
    paths: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    duplicates: int = 0  # byte-identical copies of an example met earlier
    training_photos: int = 0  # byte-identical to a photo of the training data: a labelled photo is not "neither"
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def find_neither_photos(folders: Sequence[str], training_paths: Sequence[Path]) -> NeitherPhotos:
    """Every image file under each folder (recursively, links followed as for the training data), each byte-
    identical file once, and none that is also a photo of the training data (by content)."""
    found = NeitherPhotos([str(folder) for folder in folders])
    labels = folder_labels(folders)
    training = {content_digest(path) for path in training_paths}
    seen: set[str] = set()
    for folder, label in zip(folders, labels):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"--neither {folder}: no such folder")
        paths, ignored = find_image_files(folder)
        found.ignored.extend(ignored)
        if not paths:
            left_out = describe_left_out(ignored)
            raise DataError(f"--neither {folder}: no images found" + (f"; {left_out}" if left_out else ""))
        for path in paths:
            try:
                digest = content_digest(path)
            except OSError as error:
                found.ignored.append((str(path), f"unreadable ({error.strerror or error})"))
                continue
            if digest in seen:
                found.duplicates += 1
                continue
            if digest in training:
                found.training_photos += 1
                continue
            seen.add(digest)
            found.paths.append(path)
            found.names.append(f"{label}/{relative_to_root(path, folder)}")
            found.digests.append(digest)
    return found


def folder_labels(folders: Sequence[str]) -> list[str]:
    """Each folder's name as the examples' names start with it; the path as given where two share a name."""
    names = [Path(folder).resolve().name or str(folder) for folder in folders]
    return [name if names.count(name) == 1 else str(folder).rstrip("/") for name, folder in zip(names, folders)]


def held_out_mask(digests: Sequence[str], seed: int, share: float = HELD_OUT_SHARE) -> np.ndarray:
    """Which examples the estimate holds out: a seeded function of each one's content, so the same photos are held
    out whichever order or folder they come in."""
    draws = [int(hashlib.sha1(f"{seed}:{digest}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for digest in digests]
    return np.asarray(draws) < share


@dataclass
class TaughtNeither:
    """What a run learnt from its taught examples: the head (weight [D], bias) on L2-normalised features and the
    k-NN bank of the examples."""

    weight: np.ndarray
    bias: float
    bank: KnnScorer

    @classmethod
    def fit(cls, examples: np.ndarray, training_features: np.ndarray, seed: int = 0) -> tuple["TaughtNeither", np.ndarray]:
        """The head (training photos against `examples`) and the bank; and which rows of `examples` the bank holds
        (all of them up to NEITHER_BANK_SIZE, else a seeded sample, in order)."""
        from sklearn.linear_model import LogisticRegression  # imported here: scikit-learn costs ~2 s at start-up

        if len(training_features) > HEAD_TRAINING_PHOTOS:
            rows = np.sort(np.random.default_rng(seed).choice(len(training_features), HEAD_TRAINING_PHOTOS, replace=False))
            training_features = training_features[rows]
        inputs = normalised(np.r_[training_features, examples].astype(np.float32))
        targets = np.r_[np.zeros(len(training_features)), np.ones(len(examples))]
        head = LogisticRegression(C=HEAD_C, class_weight="balanced", max_iter=3000).fit(inputs, targets)
        chosen = np.arange(len(examples))
        if len(chosen) > NEITHER_BANK_SIZE:
            chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), NEITHER_BANK_SIZE, replace=False))
        bank = KnnScorer.fit(examples[chosen], k=NEITHER_K, bank_size=len(chosen), dimensions=KNN_DIMENSIONS, seed=seed)
        return cls(head.coef_[0].astype(np.float32), float(head.intercept_[0]), bank), chosen

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The head's decision value (`neither_score`) of each row of `features`, as the graph computes it."""
        return normalised(features.astype(np.float32)) @ self.weight + np.float32(self.bias)

    def outputs(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(neither_score, neither_distance, nearest_neither) of each row, as the exported file gives them."""
        distances, nearest = self.bank.scores_and_nearest(features)
        return self.scores(features), distances, nearest

    def choose(self, validation_features: np.ndarray, validation_ood_scores: np.ndarray, keep: float) -> tuple[float, float]:
        """(threshold of the head keeping `keep` of the validation photos, margin of the bank keeping BANK_KEEP)."""
        threshold = threshold_keeping(self.scores(validation_features), keep)
        margin = threshold_keeping(taught_advantage(validation_ood_scores, self.bank.scores(validation_features)), BANK_KEEP)
        return threshold, margin

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"bank": self.bank.bank, "weight": self.weight, "bias": np.array([self.bias], dtype=np.float32)}
        if self.bank.projection is not None:
            tensors["projection"] = self.bank.projection
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata={"method": "logistic+knn", "k": str(self.bank.k)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TaughtNeither":
        with safe_open(str(path), framework="numpy") as handle:
            projection = handle.get_tensor("projection") if "projection" in handle.keys() else None
            bank = KnnScorer(handle.get_tensor("bank"), int(handle.metadata()["k"]), projection)
            return cls(handle.get_tensor("weight"), float(handle.get_tensor("bias")[0]), bank)

    def module(self) -> "TaughtNeitherScore":
        return TaughtNeitherScore(self)


class TaughtNeitherScore(nn.Module):
    """The taught examples in the graph: features [N, D] -> (neither_score [N], neither_distance [N], nearest_neither
    [N] int64)."""

    def __init__(self, taught: TaughtNeither):
        super().__init__()
        self.nearest = taught.bank.nearest_module()
        self.register_buffer("weight", torch.from_numpy(taught.weight).float())
        self.register_buffer("bias", torch.tensor([taught.bias], dtype=torch.float32))

    @property
    def bank(self):  # the bank's tensors, for the export's parity check of the nearest example
        return self.nearest.bank

    @property
    def projection(self):
        return self.nearest.projection

    def forward(self, features: torch.Tensor):
        unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        distance, nearest = self.nearest(features)
        return unit @ self.weight + self.bias, distance, nearest


def fit_taught_neither(photos: NeitherPhotos, features: np.ndarray, usable: np.ndarray, pet_scorer: KnnScorer,
                       threshold: float, training_features: np.ndarray, validation_features: np.ndarray, keep: float,
                       run_dir: Path, seed: int = 0, log=print) -> dict:
    """Fit the head and the bank of the taught examples (`features`: the rows of `photos` whose features are usable,
    `usable` their positions) against the training photos' features, save them in the run (`neither.safetensors`),
    choose their thresholds on the validation photos, estimate on held-out examples how many the rule refuses;
    return RunMeta's neither_* fields."""
    names = [photos.names[i] for i in usable]
    digests = [photos.digests[i] for i in usable]
    validation_scores = pet_scorer.scores(validation_features)
    summary: dict = {"folders": photos.folders, "found": len(photos) + photos.duplicates + photos.training_photos,
                     "duplicates_left_out": photos.duplicates, "training_photos_left_out": photos.training_photos,
                     "unreadable": len(photos) - len(usable), "k": NEITHER_K, "head_c": HEAD_C}

    def refusals(taught: TaughtNeither, head_threshold: float, margin: float, rows: np.ndarray, scores: np.ndarray):
        return taught_refusals(scores, taught.bank.scores(rows), margin, taught.scores(rows), head_threshold)

    held = held_out_mask(digests, seed)
    if held.sum() >= MIN_HELD_OUT and (~held).sum() >= MIN_HELD_OUT:
        partial, _ = TaughtNeither.fit(features[~held], training_features, seed)
        partial_threshold, partial_margin = partial.choose(validation_features, validation_scores, keep)
        held_scores = pet_scorer.scores(features[held])
        taught = refusals(partial, partial_threshold, partial_margin, features[held], held_scores)
        automatic = held_scores > threshold
        summary["held_out"] = {"photos": int(held.sum()), "refused_share": float((taught | automatic).mean()),
                               "refused_by_taught_share": float(taught.mean()),
                               "refused_without_taught_share": float(automatic.mean())}

    shipped, chosen = TaughtNeither.fit(features, training_features, seed)
    shipped.save(run_dir / NEITHER_FILE)
    head_threshold, margin = shipped.choose(validation_features, validation_scores, keep)
    taught = refusals(shipped, head_threshold, margin, validation_features, validation_scores)
    automatic = validation_scores > threshold
    summary.update({"photos": len(chosen), "threshold": head_threshold, "margin": margin,
                    "validation_photos": len(validation_scores),
                    "validation_refused_by_taught_share": float(taught.mean()),
                    "validation_refused_share": float((taught | automatic).mean())})
    log(describe(summary, shipped.bank))
    return {"neither_margin": margin, "neither_threshold": head_threshold, "neither_keep": keep,
            "neither_files": [names[i] for i in chosen], "neither_summary": summary}


def describe(summary: dict, bank: KnnScorer | None = None) -> str:
    """The training log's lines about the taught examples."""
    left_out = [f"{summary[key]} {what}" for key, what in (("duplicates_left_out", "duplicates"),
                                                            ("training_photos_left_out", "also training photos"),
                                                            ("unreadable", "unreadable")) if summary.get(key)]
    lines = [f"neither: {summary['photos']} taught examples from {', '.join(summary['folders'])}"
             + (f" ({', '.join(left_out)} left out)" if left_out else "")
             + f"; head threshold {summary['threshold']:.4f}, bank margin {summary['margin']:.4f}"
             + (f" (bank in {bank.bank.shape[1]} dimensions, k={bank.k})" if bank is not None else "")
             + f"; they refuse {summary['validation_refused_by_taught_share']:.1%} of the validation photos (with the "
             f"automatic score {summary['validation_refused_share']:.1%})"]
    held = summary.get("held_out")
    if held:
        lines.append(f"neither: held-out estimate: {held['photos']} taught examples scored by a rule fitted on the others: "
                     f"{held['refused_share']:.1%} refused ({held['refused_without_taught_share']:.1%} by the automatic "
                     "score alone)")
    return "\n".join(lines)
