"""The Python API: catdog from a notebook or a script.

    import catdog

    run = catdog.train(data="data/train", preset="fast", run_dir="runs/fast")   # a Run: path, config, metrics
    metrics = catdog.evaluate(run)                                              # metrics.json's content
    model = catdog.load(run)                                                    # catdog.load() alone: built-in model
    model.predict(["photos/1.jpg", "more-photos/", pil_image])                  # one Prediction per image
    model.explain("photos/1.jpg")                                               # Grad-CAM of the predicted class
    study = catdog.tune(data="data/train", preset="fast", trials=10)            # best_params train() accepts

Every function fills the command's own config dataclass (`TrainConfig`, `EvaluateConfig`, `TuneConfig`) from its
keyword arguments and calls the same function the `catdog` command calls, so the API and the command line take the
same options, validate them the same way and cannot drift apart. Keyword names are the command's option names
with underscores (`--val-fraction` is `val_fraction=`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

if TYPE_CHECKING:
    from PIL import Image

    from catdog.runtime.runs import RunMeta
    from catdog.runtime.explain import Explanation
    from catdog.runtime.predict import Predictor

Log = Union[Callable[[str], None], None]


def _quiet(message: str) -> None:
    """The `log` used for `log=None`: progress messages go nowhere."""


def _config(config_class: type, command: str, values: dict[str, Any]):
    """`config_class(**values)`, but an unknown keyword names the command's valid options instead of Python's bare
    "unexpected keyword argument"."""
    names = [field.name for field in dataclasses.fields(config_class)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"catdog.{command}() got unknown option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    return config_class(**values)


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """A trained run directory: where it is, how it was trained and its validation figures.

    path: the run directory (model.safetensors, meta.json, config.json, history.csv, split.json, ...).
    config: the resolved training configuration (config.json), including the strategy and device used.
    metrics: validation figures at the best epoch (accuracy, log_loss, roc_auc, macro_f1).
    meta: what the model needs to be used again (model name, class names, preprocessing, temperature).
    """

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    meta: "RunMeta"

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        """The run in `path`; `RunError` if it is not a catdog run directory."""
        from catdog.runtime.runs import check_not_pickle, read_meta

        check_not_pickle(path)
        path = Path(path)
        meta = read_meta(path)
        config_path = path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(path, config, dict(meta.metrics), meta)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per epoch from history.csv (empty when the run has none)."""
        history_path = self.path / "history.csv"
        if not history_path.is_file():
            return []
        with open(history_path, newline="") as stream:
            return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                    for row in csv.DictReader(stream)]

    def __repr__(self) -> str:
        figures = ", ".join(f"{key} {value:.4f}" for key, value in self.metrics.items() if isinstance(value, float))
        return f"Run({str(self.path)!r}: {self.meta.model_name}, {self.meta.strategy}; {figures})"


RunLike = Union[Run, str, os.PathLike]


def _run_path(run: RunLike) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def train(data: str | os.PathLike | Sequence[str | os.PathLike] = "", *, preset: str = "default",
          run_dir: str | os.PathLike | None = None, log: Log = print, **options: Any) -> Run:
    """Train a classifier, as `catdog train` does, and return the run.

    data: a folder (Kaggle flat, class sub-folders, PetImages) or a CSV manifest `path,label`; or a list of them
    (several sources, merged as `--data A --data B` merges them). `neither=[folder, ...]`: photos that are none of
    the classes (`--neither`).
    preset: "fast" (EfficientNet-Lite0 features) or "default" (Lite2 features at 300 px, more accurate).
    run_dir: the run directory to create (the command's `--out`; default runs/latest).
    log: called with each progress message; None for silence.
    options: any other `catdog train` option, e.g. `epochs=10`, `strategy="finetune"`, `progress=False`.
    """
    from catdog.training.train import TrainConfig
    from catdog.training.train import train as train_command

    if run_dir is not None:
        if "out" in options:
            raise TypeError("catdog.train() takes run_dir or out, not both")
        options["out"] = str(run_dir)
    sources = [str(source) for source in data] if isinstance(data, (list, tuple)) else str(data)
    if "neither" in options and isinstance(options["neither"], (list, tuple)):
        options["neither"] = [str(folder) for folder in options["neither"]]
    config = _config(TrainConfig, "train", {"data": sources, "preset": preset, **options})
    result = train_command(config, log=log or _quiet)
    return Run.open(result.run_dir)


def evaluate(run: RunLike, data: str | os.PathLike | None = None, *, log: Log = print, **options: Any) -> dict[str, Any]:
    """Score a run on labelled data, as `catdog evaluate` does; return its metrics (metrics.json's content).

    data: labelled images; None: the run's own validation split.
    options: any other `catdog evaluate` option, e.g. `out="folder"` (default: <run>/evaluation, which also holds
    confusion_matrix.png, roc.png, mistakes.png and predictions.csv), `tta=False`.
    """
    from catdog.training.evaluate import EvaluateConfig, evaluate_run

    values = {"run": str(_run_path(run)), "data": str(data) if data else "", **options}
    return evaluate_run(_config(EvaluateConfig, "evaluate", values), log=log or _quiet)


def tune(data: str | os.PathLike, *, log: Log = print, **options: Any) -> dict[str, Any]:
    """Search hyper-parameters with Optuna, as `catdog tune` does; return the study's summary.

    The summary's `best_params` are `catdog.training.train` options: `catdog.train(data, **study["best_params"])`.
    options: any other `catdog tune` option, e.g. `preset="fast"`, `trials=10`, `out="runs/tune"`.
    """
    from catdog.training.tune import TuneConfig, run_tuning

    return run_tuning(_config(TuneConfig, "tune", {"data": str(data), **options}), log=log or _quiet)


# ---------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Prediction:
    """One image's prediction. path: the file, or None for an in-memory image without a file name.
    in_distribution: False when the photo is unlike the training photos ("neither"; `label` is then only the
    nearest class). ood_score: how unlike (None for a model without a score). refused_by: why it is neither ("",
    "unlike the training photos", or "like a taught neither example" for a model trained with `--neither`), and
    nearest_neither the taught example it is like (its file name) when that refused it."""

    path: str | None
    label: str
    confidence: float
    probabilities: dict[str, float]
    in_distribution: bool = True
    ood_score: float | None = None
    refused_by: str = ""
    nearest_neither: str = ""


ImageInput = Union[str, os.PathLike, "Image.Image"]


class Model:
    """A trained run's model (or the built-in one) ready to classify photos; made by `catdog.load`.

    The `predictor` attribute is the `catdog.runtime.predict.Predictor` that `catdog predict` and `catdog serve` use, so
    `catdog.serve.app.create_app(ServeConfig(), predictor=model.predictor)` serves the same model.
    """

    def __init__(self, predictor: "Predictor", run: Run | None):
        self.predictor = predictor
        self.run = run

    @property
    def class_names(self) -> list[str]:
        return list(self.predictor.class_names)

    def __repr__(self) -> str:
        where = f" from {self.run.path}" if self.run else ""
        return f"Model({self.predictor.describe()}{where})"

    def predict(self, inputs: ImageInput | Iterable[ImageInput], *, tta: bool | None = None, batch_size: int = 0,
                skip_unreadable: bool = False, check_orientation: bool = False) -> list[Prediction]:
        """Classify images: a path to a file or a folder (searched recursively), a PIL image, or a list of those.

        Returns one `Prediction` per image, in input order (a folder's images in file-name order; its hidden files
        and non-image names are passed over, as `catdog predict` does). An unreadable or missing file raises
        `ImageLoadError` naming every such file, unless `skip_unreadable=True`, which leaves them out with a warning;
        a folder without images raises `DataError`. tta: average each image with its mirror image; None: as the run
        was validated. check_orientation: read an image that looks turned a quarter the way up the network reads
        best (`Predictor.upright`), as `catdog predict --check-orientation` does; off by default (it made an upright
        original-size photo confidently wrong; see the README).
        """
        import numpy as np
        from PIL import Image

        from catdog.runtime.data import DataError, describe_left_out
        from catdog.runtime.images import ImageLoadError, to_rgb
        from catdog.runtime.predict import QUIET_REASONS, Decision, collect_inputs

        items = [inputs] if isinstance(inputs, (str, os.PathLike, Image.Image)) else list(inputs)
        files: list[Path] = []
        pictures: list[Image.Image] = []
        order: list[tuple[str, int]] = []  # ("file", position in files) or ("picture", position in pictures)
        problems: list[tuple[str, str]] = []
        for item in items:
            if isinstance(item, Image.Image):
                order.append(("picture", len(pictures)))
                pictures.append(item)
            elif isinstance(item, (str, os.PathLike)):
                found, left_out = collect_inputs([str(item)])
                if not found and Path(item).is_dir():
                    summary = describe_left_out(left_out)
                    raise DataError(f"no images in {item}" + (f"; {summary}" if summary else ""))
                problems.extend((path, why) for path, why in left_out if why not in QUIET_REASONS)
                order.extend(("file", len(files) + offset) for offset in range(len(found)))
                files.extend(found)
            else:
                raise TypeError(f"predict() takes paths, folders or PIL images, not {type(item).__name__}")

        def refuse_unless_skipping(problems: list[tuple[str, str]]) -> None:
            if problems and not skip_unreadable:
                listing = "; ".join(f"{path}: {reason}" for path, reason in problems)
                raise ImageLoadError(problems[0][0], problems[0][1], f"{len(problems)} input(s) unusable: {listing}")

        refuse_unless_skipping(problems)  # missing files: before any inference
        by_file: dict[int, Any] = {}
        if files:
            outcome = self.predictor.predict_files(files, batch_size=batch_size, tta=tta,
                                                   check_orientation=check_orientation)
            decisions = self.predictor.decisions(outcome.ood_scores, outcome.neither_distances, outcome.nearest_neither,
                                                 outcome.neither_scores)
            scores = outcome.ood_scores if outcome.ood_scores is not None else [None] * len(outcome.indices)
            by_file = dict(zip(outcome.indices, zip(outcome.probabilities, scores, decisions or [None] * len(scores))))
            problems.extend((str(error.path), error.reason) for error in outcome.errors)
        refuse_unless_skipping(problems)
        if problems:
            listing = "; ".join(f"{path}: {reason}" for path, reason in problems)
            warnings.warn(f"skipped {len(problems)} unusable input(s): {listing}", stacklevel=2)
        by_picture = []
        picture_batch = batch_size or self.predictor.batch_size(len(pictures)).batch_size
        for start in range(0, len(pictures), picture_batch):
            batch = np.stack([self.predictor.transform(to_rgb(picture)) for picture in pictures[start:start + picture_batch]])
            scored = self.predictor.score_batch(batch, tta, check_orientation)
            decisions = self.predictor.decisions(scored.ood_scores, scored.neither_distances, scored.nearest_neither,
                                                 scored.neither_scores)
            count = len(scored.probabilities)
            by_picture.extend(zip(scored.probabilities, scored.ood_scores if scored.ood_scores is not None else [None] * count,
                                  decisions or [None] * count))

        predictions = []
        for kind, position in order:
            if kind == "file":
                if position not in by_file:
                    continue  # unreadable, reported above
                path, (probabilities, score, decision) = str(files[position]), by_file[position]
            else:
                path, (probabilities, score, decision) = getattr(pictures[position], "filename", "") or None, by_picture[position]
            best = int(probabilities.argmax())
            decision = decision or Decision(True)
            predictions.append(Prediction(path, self.class_names[best], float(probabilities[best]),
                                          {name: float(p) for name, p in zip(self.class_names, probabilities)},
                                          decision.in_distribution, None if score is None else float(score),
                                          decision.refused_by, decision.nearest_neither))
        return predictions

    def explain(self, image: ImageInput, *, tta: bool | None = None, target: str | None = None,
                check_orientation: bool = False) -> "Explanation":
        """Grad-CAM for one image (a path or a PIL image), as `catdog explain` computes it: an `Explanation` with
        `label`, `confidence`, `probabilities`, `heatmap` (over the photo) and `overlay()` (the photo with the
        heatmap over it, a PIL image). target: the class to explain; None: the predicted class."""
        from PIL import Image

        from catdog.runtime.explain import explain_photo
        from catdog.runtime.images import load_image, to_rgb

        if target is not None and target not in self.class_names:
            raise ValueError(f"unknown class {target!r}; this model's classes: {', '.join(self.class_names)}")
        if isinstance(image, Image.Image):
            photo = to_rgb(image)
        elif isinstance(image, (str, os.PathLike)):
            photo = load_image(image)
        else:
            raise TypeError(f"explain() takes a path or a PIL image, not {type(image).__name__}")
        return explain_photo(self.predictor, photo, tta=tta, target=None if target is None else self.class_names.index(target),
                             check_orientation=check_orientation)


def load(run: RunLike | None = None, *, model: str | os.PathLike | None = None, backend: str = "auto",
         device: str = "auto") -> Model:
    """A model ready to predict: an exported file (`model="model.onnx"`, all a runtime-only install can load), a
    run (its model.onnx, or exported on first use with catdog[train]), or with neither the built-in zero-training
    cat/dog model. backend: "auto" (ONNX Runtime; PyTorch on a CUDA machine with catdog[train]), "torch" or
    "onnxruntime"."""
    from catdog.model_files import open_model

    if run is None:
        return Model(open_model(str(model or ""), "", backend, device), None)
    if model is not None:
        raise ValueError("give a run or model=, not both")
    opened = run if isinstance(run, Run) else Run.open(run)
    return Model(open_model("", str(opened.path), backend, device), opened)
