"""`catdog predict` and the `Predictor` that evaluate and serve share.

A `Predictor` holds a model, its stored preprocessing, class names and calibration temperature, and one of two
backends: PyTorch, or ONNX Runtime (about twice as fast on a CPU). `predict_files` decodes images in worker
processes while the model runs on the previous batch, and reports files that failed instead of stopping.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from catdog import __version__
from catdog.checkpoint import MODEL_FILE, RunError, RunMeta, check_not_pickle, load_model, read_meta
from catdog.config import option
from catdog.data import (DataError, ImageFileDataset, broken_link_problem, collate_skipping_bad_images, describe_left_out,
                         find_image_files)
from catdog.distributed import (
    all_gather_objects,
    init_from_environment,
    is_main_process,
    main_process_first,
    shard_indices,
    world_size,
)
from catdog.files import write_csv_atomic
from catdog.images import ImageLoadError
from catdog.models import MODEL_SPECS, ZERO_TRAINING_MODEL_NAME, create_zero_training_model
from catdog.transforms import eval_transform

ZERO_TRAINING_BACKBONE = "efficientnet_lite0"

EXIT_SOME_FILES_FAILED = 3  # documented in the README: predictions were written for every readable file


@dataclass
class PredictionOutcome:
    indices: list[int]  # positions in the input list of the files that were predicted
    probabilities: np.ndarray  # [len(indices), classes]
    errors: list[ImageLoadError]
    seconds: float


class Predictor:
    """A model ready to classify: `build_model` is called at once for the PyTorch backend, and for ONNX Runtime
    only when the model's ONNX file is not cached yet (so a warm start never imports timm or torchvision)."""

    def __init__(self, build_model: Callable[[], torch.nn.Module], meta: RunMeta, backend: str, device: torch.device,
                 cache_dir: Path | None = None, onnx_key: str = ""):
        self.meta = meta
        self.class_names = list(meta.class_names)
        self.preprocess = meta.preprocess
        self.temperature = meta.temperature
        self.device = device
        self.build_model = build_model  # also builds a PyTorch twin for Grad-CAM (`explain.explainer_for`)
        self.transform = eval_transform(meta.preprocess)
        self.backend = backend if backend != "auto" else ("onnxruntime" if device.type == "cpu" else "torch")
        self.session = None
        self.model = None
        if self.backend == "onnxruntime":
            self.session = self._onnx_session(build_model, cache_dir, onnx_key)
        else:
            self.model = build_model().eval().to(device, memory_format=torch.channels_last)

    @property
    def model_name(self) -> str:
        return self.meta.model_name

    @property
    def is_zero_training(self) -> bool:
        return self.meta.model_name == ZERO_TRAINING_MODEL_NAME

    def describe(self) -> str:
        if self.is_zero_training:
            return "the built-in zero-training cat/dog model (ImageNet EfficientNet-Lite0, cat and dog classes summed)"
        return f"{self.meta.model_name} ({', '.join(self.class_names)}) via {self.backend}"

    def _onnx_session(self, build_model: Callable[[], torch.nn.Module], cache_dir: Path | None, key: str):
        import onnxruntime

        from catdog.export import export_onnx_module
        from catdog.features import default_cache_dir, onnx_session_options

        path = (cache_dir or default_cache_dir()) / "onnx" / f"predictor-{key}.onnx"
        if not path.is_file():
            export_onnx_module(build_model().eval().cpu(), path, self.preprocess.input_size)
        return onnxruntime.InferenceSession(str(path), onnx_session_options(), providers=["CPUExecutionProvider"])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            (output,) = self.session.run(None, {"images": images.contiguous().numpy()})
            return torch.from_numpy(output)
        with torch.inference_mode():
            images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
                return self.model(images).float().cpu()

    def probabilities(self, images: torch.Tensor, tta: bool | None = None) -> np.ndarray:
        """Calibrated class probabilities for a preprocessed batch [N, 3, S, S]. `tta=None` averages the mirror
        image in exactly when the run was validated (and its temperature fitted) that way."""
        logits = self.logits(images)
        if self.meta.tta if tta is None else tta:
            logits = (logits + self.logits(images.flip(-1))) / 2
        return torch.softmax(logits / self.temperature, dim=1).numpy()

    def predict_pil(self, images: Sequence[Image.Image], tta: bool | None = None) -> np.ndarray:
        return self.probabilities(torch.stack([self.transform(image) for image in images]), tta)

    def predict_files(self, paths: Sequence[Path], batch_size: int = 64, tta: bool | None = None, num_workers: int = -1,
                      progress: Callable[[int], None] | None = None) -> PredictionOutcome:
        started = time.perf_counter()
        if num_workers < 0:
            num_workers = 1 if len(paths) > batch_size else 0  # one decoder process overlaps with the model
        dataset = ImageFileDataset(paths, None, self.transform, draft_size=self.preprocess.resize_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_skipping_bad_images, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if num_workers else None)
        indices: list[int] = []
        chunks: list[np.ndarray] = []
        errors: list[ImageLoadError] = []
        for batch in loader:
            errors.extend(batch.errors)
            if len(batch.indices):
                chunks.append(self.probabilities(batch.images, tta))
                indices.extend(batch.indices.tolist())
            if progress:
                progress(len(batch.indices) + len(batch.errors))
        probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(self.class_names)))
        return PredictionOutcome(indices, probabilities, errors, time.perf_counter() - started)


def predict_files_across_ranks(predictor: Predictor, paths: Sequence[Path], batch_size: int = 64, tta: bool | None = None,
                               num_workers: int = -1, progress: Callable[[int], None] | None = None) -> PredictionOutcome:
    """`Predictor.predict_files` shared by the ranks of a torchrun launch: each rank predicts a disjoint share of
    `paths` and every rank gets the whole outcome, in the order of `paths`, as one process would have it."""
    positions = shard_indices(len(paths))
    mine = predictor.predict_files([paths[i] for i in positions], batch_size, tta, num_workers, progress)
    if world_size() == 1:
        return mine
    indices: list[int] = []
    chunks: list[np.ndarray] = []
    errors: list[ImageLoadError] = []
    shares = all_gather_objects((positions, mine))
    for share_positions, outcome in shares:
        indices.extend(share_positions[i] for i in outcome.indices)
        chunks.append(outcome.probabilities)
        errors.extend(outcome.errors)
    order = np.argsort(indices, kind="stable")
    position_of = {str(path): i for i, path in enumerate(paths)}
    errors.sort(key=lambda error: position_of.get(error.path, len(paths)))
    return PredictionOutcome([indices[i] for i in order], np.concatenate(chunks)[order], errors,
                             max(outcome.seconds for _, outcome in shares))


def resolve_device(name: str) -> torch.device:
    from catdog.train import resolve_device as resolve

    return resolve(name)


def load_predictor(run: str | None, backend: str = "auto", device: str = "auto", cache_dir: Path | None = None) -> Predictor:
    """A run's model, or the built-in zero-training cat/dog model when `run` is empty."""
    torch_device = resolve_device(device)
    if not run:
        preprocess = MODEL_SPECS[ZERO_TRAINING_BACKBONE].preprocess
        meta = RunMeta(ZERO_TRAINING_MODEL_NAME, ["cat", "dog"], preprocess, 1.0, "zero-training")
        return Predictor(lambda: create_zero_training_model(ZERO_TRAINING_BACKBONE)[0], meta, backend, torch_device,
                         cache_dir, onnx_key=f"{ZERO_TRAINING_MODEL_NAME}-{ZERO_TRAINING_BACKBONE}-torch{torch.__version__}-{__version__}")
    check_not_pickle(run)
    meta = read_meta(run)
    try:
        digest = hashlib.sha1((Path(run) / MODEL_FILE).read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise RunError(f"{Path(run) / MODEL_FILE}: cannot read the weights ({error})") from error
    return Predictor(lambda: load_model(run)[0], meta, backend, torch_device, cache_dir,
                     onnx_key=f"{meta.model_name}-{digest}-torch{torch.__version__}-{__version__}")


# ---------------------------------------------------------------- the command


@dataclass
class PredictConfig:
    paths: list[str] = option([], "image files and/or folders (searched recursively)")
    run: str = option("", "run directory; empty: the built-in zero-training cat/dog model")
    output: str = option("predictions.csv", "CSV of path,label,confidence,prob_<class>...; -: standard output (messages go to standard error)")
    submission: str = option("", "also write a Kaggle submission CSV (id,label = probability of dog)")
    errors: str = option("", "CSV listing files that could not be read; empty: <output>.errors.csv (none with --output -)")
    clip: float = option(0.005, "submission: clip probabilities to [clip, 1 - clip] (bounds the log-loss penalty)")
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")
    backend: str = option("auto", "auto (ONNX Runtime on CPU, PyTorch on CUDA), torch or onnxruntime", choices=("auto", "torch", "onnxruntime"))
    batch_size: int = option(64, "images per inference batch")
    num_workers: int = option(-1, "decoding worker processes; -1: automatic")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        if not self.paths:
            raise ValueError("give at least one image file or folder")
        if not 0.0 <= self.clip < 0.5:
            raise ValueError("--clip must be in [0, 0.5)")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")


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


def kaggle_id(path: Path) -> str:
    numbers = re.findall(r"\d+", path.stem)
    return numbers[-1] if numbers else path.stem


def run_predict(config: PredictConfig, log: Callable[[str], None] | None = None) -> int:
    """Predict every readable file; return the process exit code (0, or EXIT_SOME_FILES_FAILED).
    With `--output -` the CSV goes to standard output and every message to standard error. Under torchrun the
    ranks predict disjoint shares of the files and rank 0 writes what one process would have written."""
    to_stdout = config.output == "-"
    if log is None:
        stream = sys.stderr if to_stdout else sys.stdout
        log = lambda message: print(message, file=stream)  # noqa: E731
    if config.run:
        check_not_pickle(config.run)  # the more fundamental mistake is named first
    paths, left_out = collect_inputs(config.paths)
    if not paths:
        summary = describe_left_out(left_out)
        raise DataError(f"no images to predict in {', '.join(config.paths)}" + (f"; {summary}" if summary else ""))
    device = init_from_environment(resolve_device(config.device))  # under torchrun: join the ranks sharing the files
    with main_process_first():  # rank 0 exports the ONNX file once; the others then find it in the cache
        predictor = load_predictor(config.run, config.backend, str(device))
    if is_main_process():
        log(f"predicting {len(paths)} images with {predictor.describe()}"
            + (f" in {world_size()} processes" if world_size() > 1 else ""))
    from tqdm.auto import tqdm

    with tqdm(total=len(shard_indices(len(paths))), unit="img", disable=not config.progress or not is_main_process(),
              dynamic_ncols=True, file=sys.stderr) as bar:
        outcome = predict_files_across_ranks(predictor, paths, config.batch_size, config.tta, config.num_workers, bar.update)
    if not is_main_process():
        return 0  # rank 0 writes the CSVs and reports
    names = predictor.class_names
    header = ["path", "label", "confidence"] + [f"prob_{name}" for name in names]
    rows = []
    for index, probabilities in zip(outcome.indices, outcome.probabilities):
        best = int(probabilities.argmax())
        rows.append([str(paths[index]), names[best], f"{probabilities[best]:.6f}"] + [f"{p:.6f}" for p in probabilities])
    if to_stdout:
        csv.writer(sys.stdout).writerows([header] + rows)
    else:
        write_csv_atomic(config.output, header, rows)
        if len(paths) <= PRINT_EACH_FILE_UP_TO:
            print_predictions(rows)
    if config.submission:
        write_submission(config.submission, [paths[i] for i in outcome.indices], outcome.probabilities, names, config.clip)
    failures = [(e.path, e.reason, e.detail) for e in outcome.errors] + [
        (path, why, "") for path, why in left_out if why not in QUIET_REASONS]
    errors_path = config.errors or ("" if to_stdout else str(Path(config.output).with_suffix("")) + ".errors.csv")
    if failures:
        if errors_path:
            write_csv_atomic(errors_path, ["path", "reason", "detail"], failures)
        for path, reason, detail in failures:
            print(f"error: {path}: {reason}" + (f" ({detail})" if detail else ""), file=sys.stderr)
    rate = len(paths) / max(outcome.seconds, 1e-9)
    log(f"wrote {len(rows)} predictions to {'standard output' if to_stdout else config.output} ({rate:.1f} images/s)"
        + (f"; submission {config.submission}" if config.submission else "")
        + (f"; {len(failures)} failed" + (f", listed in {errors_path}" if errors_path else "") if failures else ""))
    return EXIT_SOME_FILES_FAILED if failures else 0


def print_predictions(rows: Sequence[Sequence[str]]) -> None:
    """One line per file for a person at the terminal: path, label, confidence, the paths aligned."""
    width = max(len(row[0]) for row in rows) if rows else 0
    for path, label, confidence, *_ in rows:
        print(f"{path:<{width}}  {label}  {float(confidence):.3f}")


def write_submission(path: str, paths: Sequence[Path], probabilities: np.ndarray, class_names: list[str], clip: float) -> None:
    lowered = [name.lower() for name in class_names]
    if "dog" not in lowered:
        raise ValueError(f"a Kaggle submission needs a 'dog' class; this model has {class_names}")
    dog = np.clip(probabilities[:, lowered.index("dog")], clip, 1.0 - clip)
    rows = sorted(((kaggle_id(p), f"{d:.6f}") for p, d in zip(paths, dog)), key=lambda row: (len(row[0]), row[0]))
    write_csv_atomic(path, ["id", "label"], rows)
