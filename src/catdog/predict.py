"""`catdog predict` and the `Predictor` that evaluate and serve share.

A `Predictor` holds a model, its stored preprocessing, class names and calibration temperature, and one of two
backends: PyTorch, or ONNX Runtime (about twice as fast on a CPU). `predict_files` decodes images in worker
processes while the model runs on the previous batch, and reports files that failed instead of stopping.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from catdog import __version__
from catdog.checkpoint import load_model
from catdog.runs import MODEL_FILE, RunError, RunMeta, check_not_pickle, read_meta
from catdog.config import option
from catdog.data import DataError, broken_link_problem, describe_left_out, find_image_files
from catdog.files import write_csv_atomic
from catdog.images import ImageLoadError, load_image
from catdog.probabilities import softmax
from catdog.transforms import eval_transform

if TYPE_CHECKING:
    import torch

# torch, timm and the models are imported only where needed: with a cached ONNX file, `catdog predict` on a CPU
# runs on ONNX Runtime, NumPy and Pillow alone, and starts in a fraction of the time.
ZERO_TRAINING_BACKBONE = "efficientnet_lite0"
ZERO_TRAINING_STRATEGY = "zero-training"

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

    def __init__(self, build_model: Callable[[], torch.nn.Module], meta: RunMeta, backend: str, device: str = "cpu",
                 cache_dir: Path | None = None, onnx_key: str = ""):
        self.meta = meta
        self.class_names = list(meta.class_names)
        self.preprocess = meta.preprocess
        self.temperature = meta.temperature
        self.device = str(device)
        self.build_model = build_model  # also builds a PyTorch twin for Grad-CAM (`explain.explainer_for`)
        self.transform = eval_transform(meta.preprocess)
        self.backend = backend if backend != "auto" else ("onnxruntime" if self.device == "cpu" else "torch")
        self.session = None
        self.model = None
        if self.backend == "onnxruntime":
            self.session = self._onnx_session(build_model, cache_dir, onnx_key)
        else:
            import torch

            self.model = build_model().eval().to(self.device, memory_format=torch.channels_last)

    @property
    def model_name(self) -> str:
        return self.meta.model_name

    @property
    def is_zero_training(self) -> bool:
        return self.meta.strategy == ZERO_TRAINING_STRATEGY

    def describe(self) -> str:
        if self.is_zero_training:
            return "the built-in zero-training cat/dog model (ImageNet EfficientNet-Lite0, cat and dog classes summed)"
        return f"{self.meta.model_name} ({', '.join(self.class_names)}) via {self.backend}"

    def _onnx_session(self, build_model: Callable[[], torch.nn.Module], cache_dir: Path | None, key: str):
        import onnxruntime

        from catdog.export import export_onnx_module, prediction_session_options
        from catdog.files import default_cache_dir

        path = (cache_dir or default_cache_dir()) / "onnx" / f"predictor-{key}.onnx"
        if not path.is_file():
            export_onnx_module(build_model().eval().cpu(), path, self.preprocess.input_size)
        return onnxruntime.InferenceSession(str(path), prediction_session_options(), providers=["CPUExecutionProvider"])

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw model outputs [N, classes] for a preprocessed batch [N, 3, S, S]."""
        if self.session is not None:
            (output,) = self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
            return output
        import torch

        device_type = torch.device(self.device).type
        with torch.inference_mode():
            images = torch.as_tensor(np.ascontiguousarray(images)).to(self.device, non_blocking=True,
                                                                      memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=torch.float16, enabled=device_type == "cuda"):
                return self.model(images).float().cpu().numpy()

    def probabilities(self, images: np.ndarray | torch.Tensor, tta: bool | None = None) -> np.ndarray:
        """Calibrated class probabilities for a preprocessed batch [N, 3, S, S].

        tta=True averages every image's logits with its mirror image's, False never does. None (the default) does
        as the run was validated: when the run was validated with mirror averaging and stores a threshold
        (`meta.mirror_below`), only photos whose first-view confidence is below it get the mirror view; the
        threshold was chosen on the validation split so that this keeps the accuracy and log loss of averaging
        every photo, at about half the cost, since most photos are certain from the first view."""
        images = images if isinstance(images, np.ndarray) else images.numpy()  # a torch tensor from serve or a test
        logits = self.logits(images)
        if not (self.meta.tta if tta is None else tta) or not len(logits):
            return softmax(logits / self.temperature)
        unsure = np.arange(len(logits))
        if tta is None and self.meta.mirror_below is not None:
            unsure = np.flatnonzero(softmax(logits / self.temperature).max(axis=1) < self.meta.mirror_below)
        if len(unsure):
            logits[unsure] = (logits[unsure] + self.logits(images[unsure][..., ::-1])) / 2
        return softmax(logits / self.temperature)

    def predict_pil(self, images: Sequence[Image.Image], tta: bool | None = None) -> np.ndarray:
        return self.probabilities(np.stack([self.transform.array(image) for image in images]), tta)

    def default_batch_size(self) -> int:
        # ONNX Runtime on a CPU is fastest one photo at a time: a batch of EfficientNet activations at 300 px
        # outgrows the CPU caches (measured: 64 photos per batch cost about 3x more per photo than 1).
        return 1 if self.session is not None else 64

    def predict_files(self, paths: Sequence[Path], batch_size: int = 0, tta: bool | None = None, num_workers: int = -1,
                      progress: Callable[[int], None] | None = None) -> PredictionOutcome:
        """Probabilities for every readable file in `paths`; unreadable ones are reported in `errors`.
        batch_size 0: the backend's best. ONNX Runtime on a CPU decodes in a thread, overlapped with the model
        (both release the GIL); PyTorch decodes in `num_workers` processes (-1: automatic)."""
        started = time.perf_counter()
        batch_size = batch_size or self.default_batch_size()
        if self.session is not None:
            batches = decoded_batches(paths, self.transform, self.preprocess.resize_size, batch_size)
        else:
            batches = self._loader_batches(paths, batch_size, num_workers)
        indices: list[int] = []
        chunks: list[np.ndarray] = []
        errors: list[ImageLoadError] = []
        for images, batch_indices, batch_errors in batches:
            errors.extend(batch_errors)
            if len(batch_indices):
                chunks.append(self.probabilities(images, tta))
                indices.extend(batch_indices)
            if progress:
                progress(len(batch_indices) + len(batch_errors))
        probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(self.class_names)))
        return PredictionOutcome(indices, probabilities, errors, time.perf_counter() - started)

    def _loader_batches(self, paths: Sequence[Path], batch_size: int, num_workers: int):
        from torch.utils.data import DataLoader

        from catdog.datasets import ImageFileDataset, collate_skipping_bad_images

        if num_workers < 0:
            num_workers = 1 if len(paths) > batch_size else 0  # one decoder process overlaps with the model
        dataset = ImageFileDataset(paths, None, self.transform, draft_size=self.preprocess.resize_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_skipping_bad_images, pin_memory=self.device.startswith("cuda"),
                            prefetch_factor=4 if num_workers else None)
        for batch in loader:
            yield batch.images.numpy() if len(batch.indices) else None, batch.indices.tolist(), batch.errors


def predict_files_across_ranks(predictor: Predictor, paths: Sequence[Path], batch_size: int = 0, tta: bool | None = None,
                               num_workers: int = -1, progress: Callable[[int], None] | None = None) -> PredictionOutcome:
    """`Predictor.predict_files` shared by the ranks of a torchrun launch: each rank predicts a disjoint share of
    `paths` and every rank gets the whole outcome, in the order of `paths`, as one process would have it."""
    from catdog.distributed import all_gather_objects, shard_indices, world_size

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


def decoded_batches(paths: Sequence[Path], transform, draft_size: int, batch_size: int, ahead: int = 16):
    """Yield (images [B, 3, S, S], indices, errors) for consecutive files, decoded and preprocessed by one
    background thread that stays at most `ahead` files in front of the consumer (bounded memory for any number of
    files). A thread, not a process: Pillow's decoder and resize and ONNX Runtime all release the GIL, and a thread
    costs no start-up or copying of the pixels between processes."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def decode(index: int):
        try:
            return transform.array(load_image(paths[index], draft_size=draft_size))
        except ImageLoadError as error:
            return error

    with ThreadPoolExecutor(1, thread_name_prefix="catdog-decode") as pool:
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


def resolve_device(name: str, backend: str = "auto") -> str:
    """The device as text ("cpu", "cuda:0"). torch is imported to ask only when the answer can depend on it: on a
    Linux machine without a GPU driver there is no CUDA device, and prediction through ONNX Runtime then starts
    without importing torch at all (about 2 s of a `catdog predict` on a 2-core CPU)."""
    if name == "cpu" or backend == "onnxruntime" or (name == "auto" and not gpu_driver_present()):
        return "cpu"
    from catdog.train import resolve_device as resolve

    return str(resolve(name))


def gpu_driver_present() -> bool:
    """False only when surely no CUDA/ROCm device exists: Linux with no NVIDIA, AMD or WSL GPU driver."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(path).exists() for path in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def torch_version() -> str:
    """torch's version for the ONNX cache key, read without importing torch (its package metadata)."""
    from importlib.metadata import version

    return version("torch")


def load_predictor(run: str | None, backend: str = "auto", device: str = "auto", cache_dir: Path | None = None) -> Predictor:
    """A run's model, or the built-in zero-training cat/dog model when `run` is empty."""
    device = resolve_device(device, backend)
    if not run:
        from catdog.models import MODEL_SPECS, ZERO_TRAINING_MODEL_NAME, create_zero_training_model

        preprocess = MODEL_SPECS[ZERO_TRAINING_BACKBONE].preprocess
        meta = RunMeta(ZERO_TRAINING_MODEL_NAME, ["cat", "dog"], preprocess, 1.0, ZERO_TRAINING_STRATEGY)
        return Predictor(lambda: create_zero_training_model(ZERO_TRAINING_BACKBONE)[0], meta, backend, device,
                         cache_dir, onnx_key=f"{ZERO_TRAINING_MODEL_NAME}-{ZERO_TRAINING_BACKBONE}-torch{torch_version()}-{__version__}")
    check_not_pickle(run)
    meta = read_meta(run)
    try:
        digest = hashlib.sha1((Path(run) / MODEL_FILE).read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise RunError(f"{Path(run) / MODEL_FILE}: cannot read the weights ({error})") from error
    return Predictor(lambda: load_model(run)[0], meta, backend, device, cache_dir,
                     onnx_key=f"{meta.model_name}-{digest}-torch{torch_version()}-{__version__}")


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
    batch_size: int = option(0, "images per inference batch; 0: the backend's best (1 for ONNX Runtime on a CPU, 64 for PyTorch)")
    num_workers: int = option(-1, "decoding worker processes; -1: automatic")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        if not self.paths:
            raise ValueError("give at least one image file or folder")
        if not 0.0 <= self.clip < 0.5:
            raise ValueError("--clip must be in [0, 0.5)")
        if self.batch_size < 0:
            raise ValueError("--batch-size must be 0 (automatic) or more")


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
    processes = launched_processes()
    if processes > 1:  # under torchrun: join the ranks sharing the files
        import torch

        from catdog.distributed import init_from_environment, main_process_first

        device = init_from_environment(torch.device(resolve_device(config.device, config.backend)))
        with main_process_first():  # rank 0 exports the ONNX file once; the others then find it in the cache
            predictor = load_predictor(config.run, config.backend, str(device))
    else:  # one process: no torch.distributed, so that ONNX Runtime prediction never imports torch
        predictor = load_predictor(config.run, config.backend, config.device)
    main_process = processes == 1 or is_main_rank()
    if main_process:
        log(f"predicting {len(paths)} images with {predictor.describe()}"
            + (f" in {processes} processes" if processes > 1 else ""))
    from tqdm.auto import tqdm

    share = len(range(rank_of_process(), len(paths), processes))
    with tqdm(total=share, unit="img", disable=not config.progress or not main_process, dynamic_ncols=True,
              file=sys.stderr) as bar:
        if processes > 1:
            outcome = predict_files_across_ranks(predictor, paths, config.batch_size, config.tta, config.num_workers, bar.update)
        else:
            outcome = predictor.predict_files(paths, config.batch_size, config.tta, config.num_workers, bar.update)
    if not main_process:
        return 0  # rank 0 writes the CSVs and reports
    names = predictor.class_names
    header, rows = prediction_rows(paths, outcome, names)
    write_predictions(config.output, header, rows)
    if not to_stdout and len(paths) <= PRINT_EACH_FILE_UP_TO:
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


def launched_processes() -> int:
    """How many processes torchrun started for this command (WORLD_SIZE; 1 without torchrun). Read from the
    environment as `catdog.distributed` does, so that a single process never imports torch.distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_of_process() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_rank() -> bool:
    from catdog.distributed import is_main_process

    return is_main_process()


def prediction_rows(paths: Sequence[Path], outcome: PredictionOutcome, class_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """The CSV's header and one row per predicted file: path, label, confidence, then each class's probability."""
    header = ["path", "label", "confidence"] + [f"prob_{name}" for name in class_names]
    rows = []
    for index, probabilities in zip(outcome.indices, outcome.probabilities):
        best = int(probabilities.argmax())
        rows.append([str(paths[index]), class_names[best], f"{probabilities[best]:.6f}"] + [f"{p:.6f}" for p in probabilities])
    return header, rows


def write_predictions(output: str, header: list[str], rows: list[list[str]]) -> None:
    """The CSV to `output` atomically, or to standard output for "-"."""
    if output == "-":
        csv.writer(sys.stdout).writerows([header] + rows)
    else:
        write_csv_atomic(output, header, rows)


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
