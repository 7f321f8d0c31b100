"""Frozen-backbone features, computed once per image and cached on disk.

Training a linear head on features from a frozen ImageNet backbone is the fast path on a CPU: the backbone runs
once per image (and once per horizontal flip, as cheap augmentation), and every later run over the same photos,
with any split or head settings, reuses the cached vectors and trains in seconds.

Cache key: the image file's content hash (SHA-1), so renamed or moved files still hit and edited files miss;
cache folder: one per (model, preprocessing, view), so a change of input size or normalisation never reuses stale
features. Each extraction appends one shard file, written atomically.

Views (`VIEWS` are the clean ones): "original"; "flipped", its mirror image (flipped as a tensor); a damaged photo
"KIND@SEVERITY" (`corruptions.py`: the PIL image is damaged before the evaluation transform, seeded by the file's
digest), and "KIND@SEVERITY+flipped" its mirror image; "damaged-N", the N-th damaged training view of a photo
(`corruptions.training_damage`: a kind and severity drawn per photo). Damaged views are cached like clean ones,
in folders keyed by the view's name and the damage's version. A view may also be turned a quarter as a tensor
before any mirroring, as the predictor's orientation check turns a photo: "original+turned90",
"KIND@SEVERITY+turned270+flipped" (`view_name`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from catdog.runtime.version import __version__
from catdog.training import corruptions
from catdog.training.datasets import collate_skipping_bad_images
from catdog.training.export import export_onnx_module
from catdog.runtime.files import atomic_path, default_cache_dir, settings_digest  # noqa: F401 (default_cache_dir: imported from here too)
from catdog.runtime.batch_size import BatchSizeChoice, choose_batch_size
from catdog.runtime.images import ImageLoadError, load_image
from catdog.runtime.inference import session_options
from catdog.runtime.transforms import EVAL_TRANSFORM_VERSION, Preprocess, eval_transform

VIEWS = ("original", "flipped")
DAMAGE_VERSION = 1  # part of a damaged view's cache key: bump when `corruptions.py` changes what it makes


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as stream:
        return hashlib.sha1(stream.read()).hexdigest()


@dataclass
class FeatureSet:
    """Features for a list of files. features[i, v] is the vector of file i seen in view v (original, flipped);
    rows of files that failed to load are NaN and listed in `errors`."""

    features: np.ndarray  # [files, views, dim] float32
    errors: list[ImageLoadError]
    seconds: float
    computed: int  # images that went through the backbone in this call (cache misses)
    not_reached: list[int] = field(default_factory=list)  # positions the deadline came before (NaN rows, not errors)
    batch_size: BatchSizeChoice | None = None  # the backbone's batch size, when anything was computed

    def from_cache(self, total: int) -> int:
        return total - self.computed - len(self.errors) - len(self.not_reached)

    def valid_mask(self) -> np.ndarray:
        return ~np.isnan(self.features).any(axis=(1, 2))


class FeatureCache:
    """Vectors keyed by file digest, for one backbone + preprocessing + view."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.vectors: dict[str, np.ndarray] = {}
        if folder.is_dir():
            for shard in sorted(folder.glob("shard-*.safetensors")):
                try:
                    arrays = load_file(str(shard))
                    keys = json.loads(arrays.pop("keys_json").tobytes().decode())
                except Exception:  # a damaged shard only costs recomputation
                    continue
                for key, vector in zip(keys, arrays["features"]):
                    self.vectors[key] = vector

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"shard-{time.time_ns()}-{os.getpid()}.safetensors"
        keys_bytes = np.frombuffer(json.dumps(list(keys)).encode(), dtype=np.uint8)
        with atomic_path(shard) as temporary:
            save_file({"features": vectors.astype(np.float16), "keys_json": keys_bytes}, str(temporary))
        for key, vector in zip(keys, vectors):
            self.vectors[key] = vector.astype(np.float16)


TURN_SUFFIXES = {1: "+turned90", 3: "+turned270"}  # rot90's k (counter-clockwise quarter turns) -> view suffix


def view_name(base: str, turns: int = 0, mirrored: bool = False) -> str:
    """The view of a photo ("original" or "KIND@SEVERITY") turned by rot90's k `turns`, then maybe mirrored."""
    if base == "original" and not turns:
        return "flipped" if mirrored else "original"
    return base + (TURN_SUFFIXES[turns] if turns else "") + ("+flipped" if mirrored else "")


def split_view(view: str) -> tuple[str, int, bool]:
    """(the image a view starts from: "clean", "KIND@SEVERITY" or "damaged-N"; the quarter turns (rot90's k)
    applied to its tensor; whether it is then mirrored)."""
    if view == "original":
        return "clean", 0, False
    if view == "flipped":
        return "clean", 0, True
    base, mirrored = (view[: -len("+flipped")], True) if view.endswith("+flipped") else (view, False)
    turns = 0
    for k, suffix in TURN_SUFFIXES.items():
        if base.endswith(suffix):
            base, turns = base[: -len(suffix)], k
    if base == "original":
        return "clean", turns, mirrored
    if base.startswith("damaged-") and base[len("damaged-"):].isdigit():
        return base, turns, mirrored
    corruptions.parse_condition(base)  # raises on an unknown view
    return base, turns, mirrored


def damaged_image(image, base: str, key: str):
    """The PIL image a view's base stands for (see `split_view`), damaged with the seed of `key` (file digest)."""
    if base == "clean":
        return image
    if base.startswith("damaged-"):
        return corruptions.training_damage(image, key, base)[0]
    kind, severity = corruptions.parse_condition(base)
    return corruptions.damage(image, kind, severity, key)


def cache_folder(cache_dir: Path, model_name: str, preprocess: Preprocess, view: str) -> Path:
    settings = {"model": model_name, "preprocess": preprocess.to_dict(), "view": view, "transform": EVAL_TRANSFORM_VERSION}
    if split_view(view)[0] != "clean":  # clean views keep the keys they always had
        settings["damage"] = DAMAGE_VERSION
    return cache_dir / "features" / f"{model_name}-{view.replace('+', '-')}-{settings_digest(settings)}"


class _ImageBytesDataset(Dataset):
    """Each file decoded once and transformed once per base image its views need: [bases, 3, S, S]."""

    def __init__(self, paths: Sequence[Path], transform: Callable, draft_size: int, bases: Sequence[str] = ("clean",),
                 keys: Sequence[str] | None = None):
        self.paths, self.transform, self.draft_size = list(paths), transform, draft_size
        self.bases, self.keys = list(bases), list(keys) if keys is not None else [str(i) for i in range(len(paths))]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index], draft_size=self.draft_size)
        except ImageLoadError as error:
            return {"index": index, "error": error}
        arrays = [self.transform(damaged_image(image, base, self.keys[index])) for base in self.bases]
        return {"index": index, "image": np.stack(arrays), "label": -1}


class OnnxBackbone:
    """The backbone exported to ONNX and run by ONNX Runtime: about twice eager PyTorch's speed on a CPU.
    The export happens once per machine (cached); later runs never build the PyTorch backbone at all."""

    backend = "onnxruntime"

    def __init__(self, backbone: Callable[[], torch.nn.Module], model_name: str, preprocess: Preprocess, cache_dir: Path):
        import onnxruntime  # imported here: only the ONNX backend needs it, and it adds 0.2 s to start-up

        path = cache_dir / "onnx" / f"{model_name}-backbone-{preprocess.input_size}-torch{torch.__version__}-{__version__}.onnx"
        if not path.is_file():
            export_onnx_module(backbone(), path, preprocess.input_size, output_names=("features",))
        # As many threads as torch's pool: the decoder process shares the CPU with it.
        self.threads = max(1, torch.get_num_threads())
        self.session = onnxruntime.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"images": images.numpy()})
        return torch.from_numpy(features)


def make_backbone_runner(
    backbone: Callable[[], torch.nn.Module], model_name: str, preprocess: Preprocess, device: torch.device, backend: str,
    cache_dir: Path,
) -> "OnnxBackbone | TorchBackbone":
    """A function images -> features. backend: "onnxruntime", "torch" or "auto" (ONNX Runtime on CPU).
    `backbone` is a zero-argument function returning the module, called only when the module is needed."""
    if backend == "auto":
        backend = "onnxruntime" if device.type == "cpu" else "torch"
    if backend == "onnxruntime":
        return OnnxBackbone(lambda: backbone().eval(), model_name, preprocess, cache_dir)
    return TorchBackbone(backbone(), device)


class TorchBackbone:
    """The backbone in PyTorch on `device` (channels_last; mixed precision on CUDA)."""

    backend = "torch"
    threads = 0

    def __init__(self, backbone: torch.nn.Module, device: torch.device):
        self.module, self.device = backbone.eval().to(device, memory_format=torch.channels_last), device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            return self.module(images).float().cpu()


def backbone_batch_size(runner, model_name: str, preprocess: Preprocess, device: torch.device, images: int,
                        forced: int = 0, cache_dir: Path | None = None,
                        log: Callable[[str], None] | None = None) -> BatchSizeChoice:
    """The batch size the backbone extracts fastest at on this machine (`batch_size.choose_batch_size`)."""
    size = preprocess.input_size
    key = {"model": model_name, "input": size, "outputs": ["features"], "backend": runner.backend,
           "threads": runner.threads}
    return choose_batch_size(lambda batch: runner(torch.from_numpy(batch)), (3, size, size), key, images, forced,
                             str(device), cache_dir, log=log)


def extract_features(
    paths: Sequence[Path],
    backbone: Callable[[], torch.nn.Module],
    model_name: str,
    preprocess: Preprocess,
    views: Sequence[str] = ("original",),
    *,
    device: torch.device = torch.device("cpu"),
    backend: str = "auto",
    cache_dir: Path | None = None,
    batch_size: int = 0,
    num_workers: int = 1,
    progress: Callable[[int], None] | None = None,
    deadline: float | None = None,
    seed: int = 0,
    compute_missing: bool = True,
) -> FeatureSet:
    """Features for every path in each view, from the cache where possible. Bad files become NaN rows + errors.
    `backbone` returns the frozen backbone module; it is only called on a cache miss.

    With a `deadline` (a time.perf_counter() value) the cache misses are computed in a seeded random order and the
    work stops after the batch that passes it: what was reached is an unbiased sample, it is cached, and a later
    call continues with the rest. `compute_missing=False` only reads the cache: files not in it are "not reached".
    batch_size 0: the size the backbone runs fastest at on this machine (`backbone_batch_size`)."""
    started = time.perf_counter()
    cache_dir = cache_dir or default_cache_dir()
    caches = {view: FeatureCache(cache_folder(cache_dir, model_name, preprocess, view)) for view in views}
    digests: list[str | None] = []
    errors: list[ImageLoadError] = []
    for path in paths:
        try:
            digests.append(file_digest(path))
        except OSError as error:
            digests.append(None)
            errors.append(ImageLoadError(str(path), "unreadable file", str(error)))
    missing = [i for i, digest in enumerate(digests) if digest is not None and any(digest not in caches[v].vectors for v in views)]
    if deadline is not None:
        missing = [missing[i] for i in np.random.default_rng(seed).permutation(len(missing))]
    computed: dict[int, np.ndarray] = {}
    choice = None
    processed = 0  # cache misses the loop has got to (computed or failed)
    if missing and compute_missing:
        runner = make_backbone_runner(backbone, model_name, preprocess, device, backend, cache_dir)
        choice = backbone_batch_size(runner, model_name, preprocess, device, len(missing) * len(views), batch_size, cache_dir)
        batch_size = choice.batch_size
        split = [split_view(view) for view in views]
        bases = list(dict.fromkeys(base for base, _, _ in split))
        dataset = _ImageBytesDataset([paths[i] for i in missing], eval_transform(preprocess), preprocess.resize_size,
                                     bases, [digests[i] for i in missing])
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_skipping_bad_images,
            pin_memory=device.type == "cuda",
        )
        for batch in loader:
            errors.extend(batch.errors)
            if len(batch.images):
                outputs = []
                for base, turns, mirrored in split:
                    images = batch.images[:, bases.index(base)]
                    images = images.rot90(turns, dims=(-2, -1)) if turns else images
                    outputs.append(runner((images.flip(-1) if mirrored else images).contiguous()))
                stacked = torch.stack(outputs, dim=1).numpy()
                for row, dataset_index in zip(stacked, batch.indices.tolist()):
                    computed[missing[dataset_index]] = row
            processed += len(batch.images) + len(batch.errors)
            if progress:
                progress(len(batch.images) + len(batch.errors))
            if deadline is not None and time.perf_counter() > deadline:
                break
        order = sorted(computed)
        for view_index, view in enumerate(views):
            caches[view].add([digests[i] for i in order], np.stack([computed[i][view_index] for i in order]) if order else np.zeros((0, 1)))
    dimension = next(iter(computed.values())).shape[-1] if computed else _cached_dimension(caches)
    features = np.full((len(paths), len(views), dimension or 1), np.nan, dtype=np.float32)
    for i, digest in enumerate(digests):
        if i in computed:
            # Rounded to the cache's float16, so a later run from the cache trains on the very same numbers (and a
            # distributed run, whose rank 0 reads the other ranks' features back from the cache, matches one process).
            features[i] = computed[i].astype(np.float16)
        elif digest is not None and all(digest in caches[v].vectors for v in views):
            features[i] = np.stack([caches[v].vectors[digest] for v in views]).astype(np.float32)
    return FeatureSet(features, errors, time.perf_counter() - started, len(computed), sorted(missing[processed:]), choice)


def _cached_dimension(caches: dict[str, FeatureCache]) -> int | None:
    for cache in caches.values():
        for vector in cache.vectors.values():
            return vector.shape[-1]
    return None
