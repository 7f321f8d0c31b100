"""Run directories as the runtime sees them: their metadata (`meta.json`) and the rules for opening them.

This module is part of the runtime layer: it never imports torch. The weights themselves (`model.safetensors`) are
read by `catdog.training.checkpoint` in the training layer; predicting and serving read an exported model file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from catdog.runtime.version import __version__
from catdog.runtime.transforms import Preprocess

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
OOD_FILE = "ood.safetensors"  # the out-of-distribution bank (catdog.training.ood), exported with the weights
NEITHER_FILE = "neither.safetensors"  # the taught "neither" examples' bank (catdog.training.neither), likewise
LAST_CHECKPOINT_FILE = "last_checkpoint.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


class RunError(Exception):
    """A run directory that is missing, incomplete or holds an unsafe file."""


@dataclass
class RunMeta:
    """What a saved model needs to be used again, exactly as it was trained.

    model_name: key of `models.MODEL_SPECS`.
    class_names: output index -> class name.
    preprocess: evaluation preprocessing (input size, crop, mean, std).
    temperature: logits are divided by it before softmax (calibrated on the validation split; 1.0 = none).
    strategy: how the weights were trained ("head" on cached features or "finetune").
    tta: whether validation (and the temperature) averaged each image with its mirror image; predict does the same
    unless told otherwise.
    metrics: validation figures at the best epoch.
    mirror_below: with tta, predict adds the mirror view only for photos whose first-view confidence is below this
    (chosen on the validation split so that accuracy and log loss stay those of averaging every photo; see
    `probabilities.choose_mirror_threshold`); None: every photo gets it.
    ood_method: how the out-of-distribution score is computed ("knn": distance to the k-th nearest training photo,
    "imagenet": the built-in model's mass outside the cat and dog classes); empty: the run has no score.
    ood_threshold: a photo whose score is above it is "neither" (unlike the training photos).
    ood_keep: the share of validation photos the threshold was chosen to keep.
    ood_validation_scores: the validation photos' scores, sorted, so a threshold for another share can be chosen
    later (`--ood-keep`) without the training photos.
    neither_margin: with taught "neither" examples (`catdog train --neither DIR`, `neither.safetensors`): a photo
    nearer them than the training photos by more than this (`probabilities.taught_refusals`) is "neither" too;
    None: the run has none.
    neither_threshold: and a photo the examples' head (pets against examples) scores above this is "neither" too.
    neither_keep: the share of validation photos the head's threshold was chosen to keep.
    neither_files: the taught examples' names (folder name / path inside it), in the order of the bank, so an
    answer can say which one a photo is like.
    neither_summary: what was used and measured: counts (photos, left out as duplicates or as training photos,
    unreadable), the held-out estimate, the validation photos refused.
    """

    model_name: str
    class_names: list[str]
    preprocess: Preprocess
    temperature: float = 1.0
    strategy: str = "finetune"
    tta: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    mirror_below: float | None = None
    ood_method: str = ""
    ood_threshold: float | None = None
    ood_keep: float | None = None
    ood_validation_scores: list[float] = field(default_factory=list)
    neither_margin: float | None = None
    neither_threshold: float | None = None
    neither_keep: float | None = None
    neither_files: list[str] = field(default_factory=list)
    neither_summary: dict[str, Any] = field(default_factory=dict)
    catdog_version: str = __version__

    @property
    def taught_neither(self) -> int:
        """How many taught "neither" examples the run's bank holds (0: none)."""
        return len(self.neither_files) if self.neither_margin is not None else 0

    def to_dict(self) -> dict:
        values = asdict(self)
        values["preprocess"] = self.preprocess.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "RunMeta":
        values = dict(values)
        values["preprocess"] = Preprocess.from_dict(values["preprocess"])
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


def read_meta(run_dir: str | os.PathLike) -> RunMeta:
    path = Path(run_dir) / META_FILE
    try:
        return RunMeta.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunError(f"{run_dir}: not a catdog run directory (no {META_FILE})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise RunError(f"{path}: unreadable run metadata ({error})") from error


def check_not_pickle(path: str | os.PathLike) -> None:
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise RunError(
            f"{path}: refusing to load a pickled file (it can run arbitrary code). catdog loads weights only from "
            "safetensors; pass a run directory made by `catdog train`."
        )


def weights_digest(run: str | os.PathLike) -> str:
    """The SHA-1 of what a run's export is made of: its weights file, its out-of-distribution bank
    (`ood.safetensors`) and taught examples' bank (`neither.safetensors`) when it has them, and its `meta.json` (preprocessing, temperature, thresholds: an export
    carries them, so an edited meta.json must not be served from an old file). An export records it, so a stale
    model.onnx is never used."""
    digest = hashlib.sha1()
    for name in (MODEL_FILE, OOD_FILE, NEITHER_FILE, META_FILE):
        path = Path(run) / name
        if name in (OOD_FILE, NEITHER_FILE) and not path.is_file():
            continue
        try:
            digest.update(path.read_bytes())
        except OSError as error:
            raise RunError(f"{path}: cannot read what the export is made of ({error})") from error
    return digest.hexdigest()
