"""`catdog predict` and the `Predictor` that evaluate, explain and serve share. Runtime layer: never imports torch.

A `Predictor` is an exported model file's network (`inference.OnnxNetwork`, or the training layer's PyTorch twin
`backends.TorchNetwork` on a GPU) with the metadata stored in the file: class names, preprocessing, calibration
temperature and the mirror-view threshold. The exported ONNX file is the deployable unit: `catdog export` writes
it, and `catdog predict --model model.onnx` and `catdog serve --model model.onnx` need nothing else, so a machine
with only `pip install catdog` (no torch) predicts exactly as the run did.

`predict_files` decodes images in a background thread while the network runs on the previous photo, and reports
files that failed instead of stopping.

"Neither": a photo is refused when its out-of-distribution score is above the run's threshold ("unlike the training
photos"), or, for a run trained with taught examples (`catdog train --neither DIR`), when the examples' head scores
it above its threshold or it is nearer one of them than any validation photo was ("like a taught neither example",
naming the nearest example). Both decisions come from the file's own outputs and metadata (`Predictor.decisions`).
"""

from __future__ import annotations

import csv
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from catdog.runtime.config import PredictConfig
from catdog.runtime.batch_size import BatchSizeChoice, choose_batch_size
from catdog.runtime.data import DataError, broken_link_problem, describe_left_out, find_image_files
from catdog.runtime.files import write_csv_atomic
from catdog.runtime.images import ImageLoadError, load_image
from catdog.runtime.probabilities import (
    QUARTER_TURNS,
    REFUSED_TAUGHT,
    REFUSED_UNLIKE,
    OrientationCheck,
    softmax,
    taught_refusals,
    threshold_keeping,
    uses_mirror_view,
)
from catdog.runtime.progress import progress_bar
from catdog.runtime.runs import RunMeta
from catdog.runtime.transforms import eval_transform

ZERO_TRAINING_STRATEGY = "zero-training"
# A model taught examples of "neither" (`catdog train --neither`) has these outputs beside "ood_score".
TAUGHT_OUTPUTS = ("neither_score", "neither_distance", "nearest_neither")
EXIT_SOME_FILES_FAILED = 3  # documented in the README: predictions were written for every readable file



class Network(Protocol):
    """What a predictor runs: ONNX Runtime (`inference.OnnxNetwork`) or PyTorch (`backends.TorchNetwork`)."""

    backend: str
    outputs: tuple[str, ...]

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]: ...


@dataclass
class PredictionOutcome:
    indices: list[int]  # positions in the input list of the files that were predicted
    probabilities: np.ndarray  # [len(indices), classes]
    errors: list[ImageLoadError]
    seconds: float
    ood_scores: np.ndarray | None = None  # [len(indices)]; None when the model has no out-of-distribution score
    # [len(indices)] each; None unless the model has taught "neither" examples: the distance to them, the index
    # of the nearest one (`Predictor.neither_files` names it) and the examples' head's score
    neither_distances: np.ndarray | None = None
    nearest_neither: np.ndarray | None = None
    neither_scores: np.ndarray | None = None


@dataclass
class BatchScores:
    """A preprocessed batch's answers (`Predictor.score_batch`): calibrated probabilities [N, classes], and, where
    the model has them, the out-of-distribution score [N] and the taught examples' distance, nearest index and
    head score [N]."""

    probabilities: np.ndarray
    ood_scores: np.ndarray | None = None
    neither_distances: np.ndarray | None = None
    nearest_neither: np.ndarray | None = None
    neither_scores: np.ndarray | None = None


@dataclass(frozen=True)
class Decision:
    """Whether one photo is like the training photos, and if not why: `refused_by` is "" (accepted),
    `REFUSED_UNLIKE` (the automatic score) or `REFUSED_TAUGHT` (nearer a taught example than the training photos by
    their rule: `nearest_neither` names the nearest; the taught reason is given whenever that rule refuses)."""

    in_distribution: bool
    refused_by: str = ""
    nearest_neither: str = ""


class Predictor:
    """A network ready to classify photos as its run was validated: preprocessing, temperature, mirror view."""

    def __init__(self, network: Network, meta: RunMeta, heatmap_offset: tuple[float, float] = (0.0, 0.0),
                 source: str = "", device: str = "cpu", ood_keep: float | None = None):
        self.network = network
        self.meta = meta
        self.class_names = list(meta.class_names)
        self.preprocess = meta.preprocess
        self.temperature = meta.temperature
        self.transform = eval_transform(meta.preprocess)
        self.heatmap_offset = heatmap_offset  # (rows, columns) in input pixels; see `export.heatmap_offset`
        self.source = source  # the model file (or run) it came from, for messages
        self.device = device
        self.ood_threshold = meta.ood_threshold
        if ood_keep is not None:  # another share of the validation photos than training chose
            if not meta.ood_validation_scores:
                raise ValueError(f"{source or meta.model_name}: --ood-keep needs the validation scores of a run "
                                 "trained by catdog >= 0.5 (the built-in model's threshold is fixed)")
            self.ood_threshold = threshold_keeping(meta.ood_validation_scores, ood_keep)
        self.orientation_check = OrientationCheck.from_validation_scores(meta.ood_validation_scores, self.ood_threshold)

    @property
    def backend(self) -> str:
        return self.network.backend

    @property
    def model_name(self) -> str:
        return self.meta.model_name

    @property
    def is_zero_training(self) -> bool:
        return self.meta.strategy == ZERO_TRAINING_STRATEGY

    @property
    def has_heatmaps(self) -> bool:
        return "class_maps" in self.network.outputs

    @property
    def has_ood_score(self) -> bool:
        """Whether this model says "neither" (runs trained before catdog 0.5 do not)."""
        return "ood_score" in self.network.outputs and self.ood_threshold is not None

    @property
    def has_taught_neither(self) -> bool:
        """Whether this model was taught examples of "neither" (`catdog train --neither`): its file computes their
        head's score and the distance to them and names the nearest, and its metadata holds the thresholds."""
        return (self.has_ood_score and self.meta.neither_margin is not None
                and set(TAUGHT_OUTPUTS) <= set(self.network.outputs))

    @property
    def neither_files(self) -> list[str]:
        return list(self.meta.neither_files)

    @property
    def score_outputs(self) -> tuple[str, ...]:
        """The network outputs besides the logits that every prediction reads: the score, the taught examples'."""
        return (("ood_score",) if self.has_ood_score else ()) + (TAUGHT_OUTPUTS if self.has_taught_neither else ())

    def taught_refusals(self, ood_scores, neither_distances, neither_scores=None) -> np.ndarray:
        """Where the taught examples refuse a photo (`probabilities.taught_refusals` with this model's thresholds)."""
        return taught_refusals(np.atleast_1d(ood_scores), np.atleast_1d(neither_distances), self.meta.neither_margin,
                               None if neither_scores is None else np.atleast_1d(neither_scores), self.meta.neither_threshold)

    def in_distribution(self, ood_scores: np.ndarray | None, neither_distances: np.ndarray | None = None,
                        neither_scores: np.ndarray | None = None) -> np.ndarray | None:
        """True where a photo is like the training photos (score at or below the threshold) and, with the taught
        examples' outputs, not refused by them."""
        if ood_scores is None:
            return None
        accepted = np.asarray(ood_scores) <= self.ood_threshold
        if neither_distances is not None and self.has_taught_neither:
            accepted = accepted & ~self.taught_refusals(ood_scores, neither_distances, neither_scores)
        return accepted

    def decisions(self, ood_scores: np.ndarray | None, neither_distances: np.ndarray | None = None,
                  nearest_neither: np.ndarray | None = None, neither_scores: np.ndarray | None = None) -> list[Decision] | None:
        """Each photo's `Decision` (None: the model has no out-of-distribution score)."""
        if ood_scores is None:
            return None
        ood_scores = np.atleast_1d(np.asarray(ood_scores))
        unlike = ood_scores > self.ood_threshold
        taught = np.zeros(len(ood_scores), dtype=bool)
        if neither_distances is not None and self.has_taught_neither:
            taught = self.taught_refusals(ood_scores, neither_distances, neither_scores)
        names = self.meta.neither_files
        result = []
        for position in range(len(ood_scores)):
            if taught[position]:
                index = int(np.atleast_1d(nearest_neither)[position]) if nearest_neither is not None else -1
                result.append(Decision(False, REFUSED_TAUGHT, names[index] if 0 <= index < len(names) else ""))
            elif unlike[position]:
                result.append(Decision(False, REFUSED_UNLIKE))
            else:
                result.append(Decision(True))
        return result

    def decide(self, ood_score: float | None, neither_distance: float | None = None, nearest_neither: int | None = None,
               neither_score: float | None = None) -> Decision:
        """One photo's `Decision`; a model without a score accepts every photo."""
        if ood_score is None:
            return Decision(True)

        def one(value):
            return None if value is None else np.array([value])

        return self.decisions(one(ood_score), one(neither_distance), one(nearest_neither), one(neither_score))[0]

    def describe(self) -> str:
        if self.is_zero_training:
            return "the built-in zero-training cat/dog model (ImageNet EfficientNet-Lite2 at 300 px, mean cat- and dog-class probabilities)"
        return f"{self.meta.model_name} ({', '.join(self.class_names)}) via {self.backend}"

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw model outputs [N, classes] for a preprocessed batch [N, 3, S, S]."""
        return self.network.run(images, ("logits",))["logits"]

    def uses_mirror_view(self, first_view_probabilities: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Which photos also get their mirror image (`probabilities.uses_mirror_view`, with this run's rule)."""
        return uses_mirror_view(first_view_probabilities, tta, self.meta.tta, self.meta.mirror_below)

    def predict_batch(self, images: np.ndarray, tta: bool | None = None,
                      check_orientation: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated class probabilities [N, classes] for a preprocessed batch [N, 3, S, S] (see
        `uses_mirror_view`), and each photo's out-of-distribution score [N] (None without one), from its first view:
        the score compares a photo with the training photos as it came, not mirrored or turned. check_orientation:
        photos that look turned a quarter are read the way up they look most like the training photos (`upright`).
        `score_batch` gives the taught examples' outputs too."""
        scored = self.score_batch(images, tta, check_orientation)
        return scored.probabilities, scored.ood_scores

    def score_batch(self, images: np.ndarray, tta: bool | None = None, check_orientation: bool = False) -> BatchScores:
        """`predict_batch`, with the taught "neither" examples' distance and nearest index (first view, like the
        score) where the model has them."""
        outputs = self.network.run(images, ("logits",) + self.score_outputs)
        logits, ood_scores = outputs["logits"], outputs.get("ood_score")
        taught = (outputs.get("neither_distance"), outputs.get("nearest_neither"), outputs.get("neither_score"))
        if check_orientation and len(logits):
            images, logits, _ = self.upright(images, logits, ood_scores)
        probabilities = softmax(logits / self.temperature)
        mirrored = np.flatnonzero(self.uses_mirror_view(probabilities, tta)) if len(logits) else []
        if len(mirrored):
            logits[mirrored] = (logits[mirrored] + self.logits(images[mirrored][..., ::-1])) / 2
            probabilities = softmax(logits / self.temperature)
        return BatchScores(probabilities, ood_scores, *taught)

    @property
    def checks_orientation(self) -> bool:
        """Whether photos can be checked for a quarter turn: it needs the run's validation scores (catdog >= 0.5)."""
        return self.has_ood_score and self.orientation_check is not None

    def upright(self, images: np.ndarray, logits: np.ndarray, ood_scores: np.ndarray | None):
        """(images, logits, turns) with the photos that look turned a quarter replaced by the view the network
        reads best (`probabilities.OrientationCheck`): their turned image and its logits. turns [N]: the rot90 k
        applied to each photo (0: as it was). The inputs are not changed; without the check
        (`checks_orientation`) they come back as they are."""
        turns = np.zeros(len(logits), dtype=int)
        if not self.checks_orientation:
            return images, logits, turns

        def turned_outputs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            turned = np.stack([np.rot90(images[rows], k, axes=(2, 3)) for k in QUARTER_TURNS], axis=1)  # [R, turns, 3, S, S]
            outputs = self.network.run(np.ascontiguousarray(turned.reshape(-1, *images.shape[1:])), ("logits", "ood_score"))
            return (outputs["logits"].reshape(len(rows), len(QUARTER_TURNS), -1),
                    outputs["ood_score"].reshape(len(rows), len(QUARTER_TURNS)))

        rows, ks, turned_logits = self.orientation_check.turns_to_take(logits, ood_scores, self.temperature, turned_outputs)
        if not len(rows):
            return images, logits, turns
        images, logits = images.copy(), logits.copy()
        images[rows] = [np.rot90(images[row], k, axes=(1, 2)) for row, k in zip(rows, ks)]
        logits[rows] = turned_logits
        turns[rows] = ks
        return images, logits, turns

    def probabilities(self, images: np.ndarray, tta: bool | None = None, check_orientation: bool = False) -> np.ndarray:
        """Calibrated class probabilities for a preprocessed batch [N, 3, S, S] (see `predict_batch`)."""
        return self.predict_batch(images, tta, check_orientation)[0]

    def predict_pil(self, images: Sequence[Image.Image], tta: bool | None = None, check_orientation: bool = False) -> np.ndarray:
        return self.probabilities(np.stack([self.transform(image) for image in images]), tta, check_orientation)

    def batch_size(self, images: int | None = None, forced: int = 0, cache_dir: str | os.PathLike | None = None,
                   log: Callable[[str], None] | None = None) -> BatchSizeChoice:
        """The batch size to predict about `images` photos with (None: a server's stream): `forced`, else the size
        this network runs fastest at on this machine (`batch_size.choose_batch_size`: measured once per machine,
        then cached; a short job without a stored choice takes the default, 4 on a CPU and 64 on a GPU)."""
        outputs = ("logits",) + self.score_outputs
        size = self.preprocess.input_size
        key = {"model": self.meta.model_name, "classes": len(self.class_names), "input": size, "outputs": list(outputs),
               "backend": self.backend, "threads": getattr(self.network, "threads", 0)}
        return choose_batch_size(lambda images: self.network.run(images, outputs), (3, size, size), key, images,
                                 forced, self.device, cache_dir, log=log)

    def predict_files(self, paths: Sequence[Path], batch_size: int = 0, tta: bool | None = None,
                      progress: Callable[[int], None] | None = None, decode_threads: int = 0,
                      check_orientation: bool = False) -> PredictionOutcome:
        """Probabilities for every readable file in `paths`; unreadable ones are reported in `errors`.
        batch_size 0: the fastest on this machine (`batch_size`). Decoding runs in threads overlapped with the network: decode_threads 0
        means one on a CPU (the network wants the cores) and up to 8 beside a GPU (which would otherwise wait)."""
        started = time.perf_counter()
        batch_size = batch_size or self.batch_size(len(paths)).batch_size
        decode_threads = decode_threads or (1 if self.device == "cpu" else min(8, os.cpu_count() or 1))
        indices: list[int] = []
        batches: list[BatchScores] = []
        errors: list[ImageLoadError] = []
        for images, batch_indices, batch_errors in decoded_batches(paths, self.transform, self.preprocess.resize_size,
                                                                   batch_size, decode_threads):
            errors.extend(batch_errors)
            if len(batch_indices):
                batches.append(self.score_batch(images, tta, check_orientation))
                indices.extend(batch_indices)
            if progress:
                progress(len(batch_indices) + len(batch_errors))
        probabilities = np.concatenate([b.probabilities for b in batches]) if batches else np.zeros((0, len(self.class_names)))

        def joined(name: str, present: bool, dtype) -> np.ndarray | None:
            if not present:
                return None
            return np.concatenate([getattr(b, name) for b in batches]) if batches else np.zeros(0, dtype=dtype)

        taught = self.has_taught_neither
        return PredictionOutcome(indices, probabilities, errors, time.perf_counter() - started,
                                 joined("ood_scores", self.has_ood_score, np.float32),
                                 joined("neither_distances", taught, np.float32), joined("nearest_neither", taught, np.int64),
                                 joined("neither_scores", taught, np.float32))


def decoded_batches(paths: Sequence[Path], transform, draft_size: int, batch_size: int, threads: int = 1):
    """Yield (images [B, 3, S, S], indices, errors) for consecutive files, decoded and preprocessed by `threads`
    background threads that stay at most two batches (at least 16 files) in front of the consumer (bounded memory
    for any number of files). Threads, not processes: Pillow's decoder and resize, ONNX Runtime and PyTorch all
    release the GIL, and a thread costs no start-up or copying of the pixels between processes."""
    ahead = max(16, 2 * batch_size)
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def decode(index: int):
        try:
            return transform(load_image(paths[index], draft_size=draft_size))
        except ImageLoadError as error:
            return error

    with ThreadPoolExecutor(threads, thread_name_prefix="catdog-decode") as pool:
        pending = deque(pool.submit(decode, index) for index in range(min(ahead, len(paths))))
        next_index = len(pending)
        images, indices, errors = [], [], []
        for index in range(len(paths)):
            result = pending.popleft().result()
            if next_index < len(paths):
                pending.append(pool.submit(decode, next_index))
                next_index += 1
            if isinstance(result, ImageLoadError):
                errors.append(result)
            else:
                images.append(result)
                indices.append(index)
            if len(images) == batch_size or index == len(paths) - 1:
                yield (np.stack(images) if images else None), indices, errors
                images, indices, errors = [], [], []


# ---------------------------------------------------------------- the command


# Left out without a word: a folder's hidden files and non-image names are not meant as input.
QUIET_REASONS = ("hidden file", "not an image file name")
PRINT_EACH_FILE_UP_TO = 20  # with this many files or fewer, predict also prints one line per file


def collect_inputs(arguments: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand folders recursively; keep explicitly named files even with odd extensions (the loader decides).
    Returns the files and what was left out, with why (including the quiet reasons)."""
    paths: list[Path] = []
    left_out: list[tuple[str, str]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found, ignored = find_image_files(path)
            paths.extend(found)
            left_out.extend(ignored)
        elif path.exists():
            paths.append(path)
        elif path.is_symlink():
            left_out.append((argument, broken_link_problem(path) or "broken symbolic link"))
        else:
            left_out.append((argument, "file not found"))
    return paths, left_out


def collect_or_fail(arguments: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """`collect_inputs`, refusing (DataError) when no file at all is left to predict."""
    paths, left_out = collect_inputs(arguments)
    if not paths:
        summary = describe_left_out(left_out)
        raise DataError(f"no images to predict in {', '.join(arguments)}" + (f"; {summary}" if summary else ""))
    return paths, left_out


def kaggle_id(path: Path) -> str:
    numbers = re.findall(r"\d+", path.stem)
    return numbers[-1] if numbers else path.stem


def message_log(config: PredictConfig) -> Callable[[str], None]:
    """Messages go to standard output, or to standard error when the CSV does (`--output -`)."""
    stream = sys.stderr if config.output == "-" else sys.stdout
    return lambda message: print(message, file=stream)


def run_predict(config: PredictConfig, predictor: Predictor, log: Callable[[str], None] | None = None) -> int:
    """Predict every readable file with `predictor`; return the process exit code (0, or EXIT_SOME_FILES_FAILED).
    With `--output -` the CSV goes to standard output and every message to standard error. (Under torchrun the
    training layer's `backends.run_predict_across_ranks` shares the files among the processes instead.)"""
    log = log or message_log(config)
    paths, left_out = collect_or_fail(config.paths)
    choice = predictor.batch_size(len(paths), config.batch_size, config.cache_dir or None, log)
    log(f"predicting {len(paths)} images with {predictor.describe()}, {choice.describe()}")
    with progress_bar(config.progress, len(paths), "predict", leave=True) as bar:
        outcome = predictor.predict_files(paths, choice.batch_size, config.tta, bar.update,
                                          check_orientation=config.check_orientation)
    return write_prediction_outputs(config, paths, left_out, predictor.class_names, outcome, log,
                                    *outcome_decisions(predictor, outcome))


def outcome_decisions(predictor: Predictor, outcome: PredictionOutcome) -> tuple[np.ndarray | None, list[Decision] | None]:
    """(in_distribution per predicted file, and with taught examples each file's `Decision`) for the outputs."""
    in_distribution = predictor.in_distribution(outcome.ood_scores, outcome.neither_distances, outcome.neither_scores)
    taught = predictor.has_taught_neither and outcome.neither_distances is not None
    decisions = (predictor.decisions(outcome.ood_scores, outcome.neither_distances, outcome.nearest_neither,
                                     outcome.neither_scores) if taught else None)
    return in_distribution, decisions


def write_prediction_outputs(config: PredictConfig, paths: Sequence[Path], left_out: list[tuple[str, str]],
                             class_names: list[str], outcome: PredictionOutcome, log: Callable[[str], None],
                             in_distribution: np.ndarray | None = None, decisions: list[Decision] | None = None) -> int:
    """The CSV, the terminal lines, the submission and the errors file; return the exit code. `in_distribution`:
    the out-of-distribution decision per predicted file (None: the model has no score); `decisions`: why, for a
    model with taught "neither" examples (the CSV's refused_by and nearest_neither columns; None: no such model)."""
    to_stdout = config.output == "-"
    header, rows = prediction_rows(paths, outcome, class_names, in_distribution, decisions)
    write_predictions(config.output, header, rows)
    if not to_stdout and len(paths) <= PRINT_EACH_FILE_UP_TO:
        print_predictions(header, rows)
    if config.submission:
        write_submission(config.submission, [paths[i] for i in outcome.indices], outcome.probabilities, class_names, config.clip)
    failures = [(e.path, e.reason, e.detail) for e in outcome.errors] + [
        (path, why, "") for path, why in left_out if why not in QUIET_REASONS]
    errors_path = config.errors or ("" if to_stdout else str(Path(config.output).with_suffix("")) + ".errors.csv")
    if failures:
        if errors_path:
            write_csv_atomic(errors_path, ["path", "reason", "detail"], failures)
        for path, reason, detail in failures:
            print(f"error: {path}: {reason}" + (f" ({detail})" if detail else ""), file=sys.stderr)
    rate = len(paths) / max(outcome.seconds, 1e-9)
    neither = "" if in_distribution is None else f"; {int((~in_distribution).sum())} unlike the training photos (neither)"
    if decisions is not None:
        reasons = [decision.refused_by for decision in decisions]
        neither = (f"; {int((~in_distribution).sum())} neither ({reasons.count(REFUSED_UNLIKE)} {REFUSED_UNLIKE}, "
                   f"{reasons.count(REFUSED_TAUGHT)} {REFUSED_TAUGHT})")
    log(f"wrote {len(rows)} predictions to {'standard output' if to_stdout else config.output} ({rate:.1f} images/s)"
        + neither
        + (f"; submission {config.submission}" if config.submission else "")
        + (f"; {len(failures)} failed" + (f", listed in {errors_path}" if errors_path else "") if failures else ""))
    return EXIT_SOME_FILES_FAILED if failures else 0


def launched_processes() -> int:
    """How many processes torchrun started for this command (WORLD_SIZE; 1 without torchrun), read from the
    environment so that a single process never imports torch.distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gpu_driver_present() -> bool:
    """False only when surely no CUDA/ROCm device exists: Linux with no NVIDIA, AMD or WSL GPU driver. Lets
    `--backend auto` stay on ONNX Runtime without importing torch to ask."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(path).exists() for path in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def prediction_rows(paths: Sequence[Path], outcome: PredictionOutcome, class_names: list[str],
                    in_distribution: np.ndarray | None = None,
                    decisions: list[Decision] | None = None) -> tuple[list[str], list[list[str]]]:
    """The CSV's header and one row per predicted file: path, label (the most probable class, also for a photo
    that is neither: the nearest class), confidence, each class's probability, and with an out-of-distribution
    score `ood_score` and `in_distribution` (true/false); for a model with taught "neither" examples also
    `neither_score` (their head's), `neither_distance` (to the nearest), `refused_by` (empty, "unlike the training
    photos" or "like a taught neither example") and `nearest_neither` (the nearest example's name, where they
    refused the photo)."""
    header = ["path", "label", "confidence"] + [f"prob_{name}" for name in class_names]
    if in_distribution is not None:
        header += ["ood_score", "in_distribution"]
        if decisions is not None:
            header += ["neither_score", "neither_distance", "refused_by", "nearest_neither"]
    rows = []
    for position, (index, probabilities) in enumerate(zip(outcome.indices, outcome.probabilities)):
        best = int(probabilities.argmax())
        row = [str(paths[index]), class_names[best], f"{probabilities[best]:.6f}"] + [f"{p:.6f}" for p in probabilities]
        if in_distribution is not None:
            row += [f"{outcome.ood_scores[position]:.6f}", "true" if in_distribution[position] else "false"]
            if decisions is not None:
                decision = decisions[position]
                row += [f"{outcome.neither_scores[position]:.6f}", f"{outcome.neither_distances[position]:.6f}",
                        decision.refused_by, decision.nearest_neither]
        rows.append(row)
    return header, rows


def write_predictions(output: str, header: list[str], rows: list[list[str]]) -> None:
    """The CSV to `output` atomically, or to standard output for "-"."""
    if output == "-":
        csv.writer(sys.stdout).writerows([header] + rows)
    else:
        write_csv_atomic(output, header, rows)


def print_predictions(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """One line per file for a person at the terminal: path, label, confidence, the paths aligned; a photo unlike
    the training photos says so, with the nearest class."""
    width = max(len(row[0]) for row in rows) if rows else 0
    decision = header.index("in_distribution") if "in_distribution" in header else None
    reason = header.index("refused_by") if "refused_by" in header else None
    example = header.index("nearest_neither") if "nearest_neither" in header else None
    for row in rows:
        path, label, confidence = row[0], row[1], float(row[2])
        if decision is not None and row[decision] == "false":
            why = row[reason] if reason is not None and row[reason] else REFUSED_UNLIKE
            like = f"{row[example]}; " if why == REFUSED_TAUGHT and example is not None and row[example] else ""
            print(f"{path:<{width}}  neither: {why} ({like}nearest: {label} {confidence:.3f})")
        else:
            print(f"{path:<{width}}  {label}  {confidence:.3f}")


def write_submission(path: str, paths: Sequence[Path], probabilities: np.ndarray, class_names: list[str], clip: float) -> None:
    lowered = [name.lower() for name in class_names]
    if "dog" not in lowered:
        raise ValueError(f"a Kaggle submission needs a 'dog' class; this model has {class_names}")
    dog = np.clip(probabilities[:, lowered.index("dog")], clip, 1.0 - clip)
    rows = sorted(((kaggle_id(p), f"{d:.6f}") for p, d in zip(paths, dog)), key=lambda row: (len(row[0]), row[0]))
    write_csv_atomic(path, ["id", "label"], rows)
