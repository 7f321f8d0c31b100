"""Saying "neither" to what the user showed: `catdog train --neither DIR`. Training layer (NumPy).

The automatic score (`ood.py`: the distance to the training photos) refuses what is far from every training photo:
people, objects, scenes. Animals that look like pets are near them, and only the user can say that they are not
pets (Azure Custom Vision's "Negative" tag). `--neither DIR` (repeatable; any layout, sub-folders searched) gives
such photos. They never become a class of the model and are never counted in its accuracy; the run keeps their
features, from the same network as the automatic score's bank (the frozen backbone's first view for the head
strategy, the fine-tuned network's for fine-tuning), as a second k-NN bank (`neither.safetensors`, the same
`ood.KnnScorer`: its own top principal directions, float16), and the rule becomes:

    neither  <=>  ood_score > threshold                       (unlike the training photos: as before)
              or  ood_score - neither_distance > margin       (nearer a taught example than the pets, by the margin)

where `neither_distance` is the photo's distance to its k-th nearest taught example (`NEITHER_K`). The margin is
chosen on the validation photos, which neither bank holds: the value that keeps a share `--neither-keep` of them
(`probabilities.threshold_keeping` on their `ood_score - neither_distance`), so the taught examples refuse at most
that share of real pet photos whatever they show. The exported file computes `neither_distance` and the index of
the nearest taught example (`nearest_neither`) in its graph, and carries the margin and the examples' names in its
metadata, so the file alone decides as the run does.

How well it works is estimated at training time on the taught examples themselves: a fifth of them (chosen by
their content digest and the seed) is scored by a bank of the other four fifths, with a margin chosen the same way;
the share refused is in meta.json (`neither_summary.held_out`) and the log. The bank that ships holds them all.

Why this rule, measured on the default preset's cached features with half of each species folder of the shared
`not-pets-near` as --neither (benchmarks/neither.py, BENCHMARKS.md "Teaching neither"): see the constants below.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from catdog.runtime.data import DataError, content_digest, describe_left_out, find_image_files, relative_to_root
from catdog.runtime.probabilities import taught_advantage, threshold_keeping
from catdog.runtime.runs import NEITHER_FILE
from catdog.training.ood import KNN_DIMENSIONS, KnnScorer

# The taught examples' bank: k and size. k = 1 (the nearest example) against k = 3 and 5 (benchmarks/neither.py):
# a user gives a few dozen examples of a kind, not thousands, and a photo like one of them should be refused.
NEITHER_K = 1
NEITHER_BANK_SIZE = 5000
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


def fit_neither_bank(features: np.ndarray, seed: int = 0) -> tuple[KnnScorer, np.ndarray]:
    """The taught examples' bank, and which rows of `features` it holds (all of them up to NEITHER_BANK_SIZE, else a
    seeded sample, in order)."""
    chosen = np.arange(len(features))
    if len(chosen) > NEITHER_BANK_SIZE:
        chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), NEITHER_BANK_SIZE, replace=False))
    scorer = KnnScorer.fit(features[chosen], k=NEITHER_K, bank_size=len(chosen), dimensions=KNN_DIMENSIONS, seed=seed)
    return scorer, chosen


def choose_margin(validation_ood_scores: np.ndarray, validation_neither_distances: np.ndarray, keep: float) -> float:
    """The margin that keeps a share `keep` of the validation photos by the taught rule alone."""
    return threshold_keeping(taught_advantage(validation_ood_scores, validation_neither_distances), keep)


def fit_taught_neither(photos: NeitherPhotos, features: np.ndarray, usable: np.ndarray, pet_scorer: KnnScorer,
                       threshold: float, validation_features: np.ndarray, keep: float, run_dir: Path,
                       seed: int = 0, log=print) -> dict:
    """Fit the taught examples' bank on `features` (the rows of `photos` whose features are usable: `usable`, their
    positions), save it in the run (`neither.safetensors`), choose the margin on the validation photos, estimate on
    held-out examples how many it refuses; return RunMeta's neither_* fields."""
    names = [photos.names[i] for i in usable]
    digests = [photos.digests[i] for i in usable]
    validation_scores = pet_scorer.scores(validation_features)
    summary: dict = {"folders": photos.folders, "found": len(photos) + photos.duplicates + photos.training_photos,
                     "duplicates_left_out": photos.duplicates, "training_photos_left_out": photos.training_photos,
                     "unreadable": len(photos) - len(usable), "k": NEITHER_K}

    held = held_out_mask(digests, seed)
    if held.sum() >= MIN_HELD_OUT and (~held).sum() >= MIN_HELD_OUT:
        partial, _ = fit_neither_bank(features[~held], seed)
        margin = choose_margin(validation_scores, partial.scores(validation_features), keep)
        held_scores = pet_scorer.scores(features[held])
        taught = taught_advantage(held_scores, partial.scores(features[held])) > margin
        automatic = held_scores > threshold
        summary["held_out"] = {"photos": int(held.sum()), "refused_share": float((taught | automatic).mean()),
                               "refused_by_taught_share": float(taught.mean()),
                               "refused_without_taught_share": float(automatic.mean())}

    bank, chosen = fit_neither_bank(features, seed)
    bank.save(run_dir / NEITHER_FILE)
    validation_distances = bank.scores(validation_features)
    margin = choose_margin(validation_scores, validation_distances, keep)
    taught = taught_advantage(validation_scores, validation_distances) > margin
    automatic = validation_scores > threshold
    summary.update({"photos": len(chosen), "margin": margin,
                    "validation_photos": len(validation_scores),
                    "validation_refused_by_taught_share": float(taught.mean()),
                    "validation_refused_share": float((taught | automatic).mean())})
    log(describe(summary, bank))
    return {"neither_margin": margin, "neither_keep": keep, "neither_files": [names[i] for i in chosen],
            "neither_summary": summary}


def describe(summary: dict, bank: KnnScorer | None = None) -> str:
    """The training log's lines about the taught examples."""
    left_out = [f"{summary[key]} {what}" for key, what in (("duplicates_left_out", "duplicates"),
                                                            ("training_photos_left_out", "also training photos"),
                                                            ("unreadable", "unreadable")) if summary.get(key)]
    lines = [f"neither: {summary['photos']} taught examples from {', '.join(summary['folders'])}"
             + (f" ({', '.join(left_out)} left out)" if left_out else "")
             + (f"; bank in {bank.bank.shape[1]} dimensions, k={bank.k}" if bank is not None else "")
             + f"; margin {summary['margin']:.4f} refuses {summary['validation_refused_by_taught_share']:.1%} of the "
             f"validation photos (with the automatic score {summary['validation_refused_share']:.1%})"]
    held = summary.get("held_out")
    if held:
        lines.append(f"neither: held-out estimate: {held['photos']} taught examples scored by a bank of the others: "
                     f"{held['refused_share']:.1%} refused ({held['refused_without_taught_share']:.1%} by the automatic "
                     "score alone)")
    return "\n".join(lines)
