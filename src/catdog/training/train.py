"""Training: `catdog train`.

Two strategies share one loop (`train_one_epoch` + `evaluate`, plain functions with explicit arguments), each in
the `catdog.training` module named after it:
- "head" (`training/head.py`): the pretrained backbone stays frozen; its features are computed once per image (and
  its mirror image) and cached (`features.py`); only the linear head trains, on the cached vectors, in seconds per
  run. This is the default on a CPU, where fine-tuning the whole network runs at a few images per second, and on
  small data sets.
- "finetune" (`training/finetune.py`): the whole network (or only the head with --freeze-backbone) trains on
  augmented images; the default on CUDA from 2,000 training images (`resolve_strategy`), with mixed precision and
  channels_last.
What both share lives below them in `catdog.training`: the config and presets (`training/config.py`), the loop
and its building blocks (`training/loop.py`). This file is the command on top: the data (dropping what an audit
or `--exclude` rules out), the run directory (config.json, split.json, resuming), the choice of strategy, and
calibrating and saving the result. Either way the run directory ends up with one complete `Classifier` in
`model.safetensors`, so evaluate, predict, export and serve never need to know how it was trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from catdog.training.audit import current_audit_errors
from catdog.training.calibration import fit_temperature
from catdog.training.checkpoint import load_training_state, save_model
from catdog.runtime.data import DataError, LabelledImages, MergeReport, discover, merge_sources, stratified_split
from catdog.training.devices import resolve_device
from catdog.training.distributed import barrier, init_from_environment, is_main_process, world_size
from catdog.training.exclusions import exclude_listed
from catdog.runtime.files import write_csv_atomic, write_json_atomic
from catdog.runtime.images import ImageLoadError
from catdog.training.metrics import classification_metrics
from catdog.training.neither import NeitherPhotos, find_neither_photos, fit_taught_neither
from catdog.training.ood import KnnScorer, fit_out_of_distribution
from catdog.training.models import create_model
from catdog.runtime.probabilities import choose_mirror_threshold
from catdog.runtime.runs import LAST_CHECKPOINT_FILE, NEITHER_FILE, OOD_FILE, RunMeta, read_meta
from catdog.training.config import PRESETS, TrainConfig
from catdog.training.strategy import resolve_preprocess, resolve_strategy, strategy_defaults
from catdog.training.finetune import finetune
from catdog.training.head import train_head
from catdog.training.loop import seed_everything
from catdog.runtime.transforms import Preprocess

# The command's public names: `from catdog.training.train import TrainConfig, train`, `catdog.training.train.PRESETS` (both defined
# in catdog.training.config) keep working.
__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]
DUPLICATES_FILE = "duplicates.csv"  # several --data sources: the byte-identical copies left out, and the file kept


@dataclass
class TrainResult:
    run_dir: Path
    meta: RunMeta
    history: list[dict]
    skipped: list[ImageLoadError]
    seconds: float


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train a run. Under torchrun every process calls this with the same config (see `distributed.py`): rank 0
    writes the run directory and speaks; the strategy decides how the others share the work."""
    started = time.perf_counter()
    run_dir = Path(config.resume or config.out)
    resume_state = None
    if config.resume:  # every rank reads the same last checkpoint
        config, resume_state = _load_resume(run_dir, config)
    deadline = started + config.time_budget * 60 if config.time_budget else None
    device = init_from_environment(resolve_device(config.device))
    main = is_main_process()
    if not main:
        log = _quiet
    if not config.resume and (run_dir / LAST_CHECKPOINT_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it or choose another --out")

    images, audit_skipped, merged = _training_data(config, log)
    if config.exclude:
        images = _drop_excluded_files(images, config.exclude, log)
    neither = find_neither_photos(config.neither, images.paths) if config.neither else None
    train_indices, val_indices = stratified_split(images.labels, config.val_fraction, config.seed)
    train_images, val_images = images.subset(train_indices), images.subset(val_indices)
    strategy = resolve_strategy(config, device, len(train_images))
    config = strategy_defaults(config, strategy)
    seed_everything(config.seed)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # One --data source is written as one string, as before several were possible (TrainConfig reads both).
        recorded = {**asdict(config), "data": config.data[0] if len(config.data) == 1 else config.data}
        write_json_atomic(run_dir / "config.json", {**recorded, "resolved_strategy": strategy, "device": str(device),
                                                    "processes": world_size()})
        sources = [str(Path(source).resolve()) for source in config.data]
        write_json_atomic(run_dir / "split.json", {
            # One source: its path, as before; several: the list (evaluate and report merge them again alike).
            "data": sources[0] if len(sources) == 1 else sources, "root": str(images.root.resolve()), "layout": images.layout,
            "seed": config.seed, "val_fraction": config.val_fraction, "class_names": images.class_names,
            "train": train_images.relative_paths(), "val": val_images.relative_paths(),
            **({"sources": [{"source": s.source, "layout": s.layout, "class_counts": s.class_counts,
                             "duplicates_left_out": s.duplicates} for s in merged.sources]} if len(sources) > 1 else {}),
        })
        if merged.duplicates:
            write_csv_atomic(run_dir / DUPLICATES_FILE, ["left_out", "kept", "labels_differ"],
                             [(dropped, kept, int(differ)) for dropped, kept, differ in merged.duplicates])
    log(f"data: {len(images)} images in {images.layout} layout, classes {images.class_counts()}; "
        f"train {len(train_images)}, val {len(val_images)}; strategy {strategy} on {device}"
        + (f" x {world_size()} processes" if world_size() > 1 else ""))
    if images.ignored:
        log(f"data: {len(images.ignored)} files not taken as images (e.g. {images.ignored[0][0]}: {images.ignored[0][1]})")
    if neither is not None:
        log(f"neither: {len(neither)} taught examples in {', '.join(config.neither)}"
            + (f"; {neither.duplicates} duplicates left out" if neither.duplicates else "")
            + (f"; {neither.training_photos} left out as photos of the training data" if neither.training_photos else ""))
    neither_paths = neither.paths if neither is not None else []

    preprocess = resolve_preprocess(config, strategy)
    model = create_model(config.model, len(images.class_names), pretrained=config.pretrained,
                         freeze_backbone=config.freeze_backbone or strategy == "head")
    if strategy == "head":
        outcome = train_head(config, model, preprocess, train_images, val_images, device, run_dir, resume_state, deadline, log,
                             neither_paths)
    else:
        outcome = finetune(config, model, preprocess, train_images, val_images, device, run_dir, resume_state, deadline, log,
                           neither_paths)
    if main:
        result = _finish_run(config, run_dir, model, preprocess, strategy, images.class_names, outcome, audit_skipped, started,
                             log, neither)
    barrier()  # the run directory is complete before any rank returns
    if not main:  # the other ranks return the run rank 0 wrote (the run directory is on a shared file system)
        result = TrainResult(run_dir, read_meta(run_dir), [], audit_skipped, time.perf_counter() - started)
    return result


def _finish_run(config: TrainConfig, run_dir: Path, model: nn.Module, preprocess: Preprocess, strategy: str,
                class_names: list[str], outcome, audit_skipped: list[ImageLoadError], started: float, log,
                neither: NeitherPhotos | None = None) -> TrainResult:
    """Calibrate on the validation logits, save the model with its metrics, list the skipped files."""
    history, skipped, val_logits, val_labels, (train_features, val_features, neither_features) = outcome
    skipped = audit_skipped + skipped
    val_view_logits = val_logits if val_logits.dim() == 3 else None  # head strategy: [images, views, classes]
    if val_view_logits is not None:
        val_logits = val_view_logits.mean(dim=1)
    temperature = fit_temperature(val_logits, val_labels) if config.calibrate else 1.0
    probabilities = torch.softmax(val_logits / temperature, dim=1).numpy()
    metrics = classification_metrics(val_labels.numpy(), probabilities, class_names)
    mirror_below = None
    if val_view_logits is not None and val_view_logits.shape[1] == 2:
        mirror_below = choose_mirror_threshold(val_view_logits.numpy(), val_labels.numpy(), temperature, log)
    ood_threshold, ood_validation_scores = fit_out_of_distribution(train_features, val_features, config.ood_keep, run_dir,
                                                                   config.seed, log)
    taught = {}
    (run_dir / NEITHER_FILE).unlink(missing_ok=True)  # a resumed run's bank is made again from its examples
    if neither is not None:
        if neither_features is None or not len(neither_features[1]):
            raise DataError(f"--neither: none of the {len(neither)} taught examples could be read")
        taught = fit_taught_neither(neither, neither_features[0], neither_features[1], KnnScorer.load(run_dir / OOD_FILE),
                                    ood_threshold, train_features, val_features, config.neither_keep, run_dir, config.seed, log)
    meta = RunMeta(config.model, class_names, preprocess, temperature, strategy, strategy == "head" and bool(config.flip),
                   {key: metrics[key] for key in ("accuracy", "log_loss", "roc_auc", "macro_f1") if key in metrics},
                   mirror_below, "knn", ood_threshold, config.ood_keep, ood_validation_scores, **taught)
    save_model(run_dir, model, meta)
    if skipped:
        write_csv_atomic(run_dir / "skipped_files.csv", ["path", "reason", "detail"],
                         sorted({(e.path, e.reason, e.detail) for e in skipped}))
        log(f"skipped {len({e.path for e in skipped})} unreadable files (listed in {run_dir / 'skipped_files.csv'})")
    seconds = time.perf_counter() - started
    log(f"validation accuracy {metrics['accuracy']:.4f}, log loss {metrics['log_loss']:.4f} "
        f"(temperature {temperature:.3f}); {seconds:.1f} s; run saved in {run_dir}")
    return TrainResult(run_dir, meta, history, skipped, seconds)


def _quiet(_message: str) -> None:
    """The log of ranks other than 0: one process speaks for a distributed run."""


def _training_data(config: TrainConfig, log) -> tuple[LabelledImages, list[ImageLoadError], MergeReport]:
    """The labelled photos of every --data source, each read in its own layout and without what a current audit
    of it flagged, merged into one set (`data.merge_sources`: byte-identical copies left out, reported)."""
    parts, skipped = [], []
    for source in config.data:
        part, flagged = _drop_files_a_current_audit_flagged(discover(source, config.layout), log)
        parts.append(part)
        skipped += flagged
    images, merged = merge_sources(parts, config.data)
    if len(parts) > 1:
        log(merged.describe())
    return images, skipped, merged


def _drop_files_a_current_audit_flagged(images: LabelledImages, log) -> tuple[LabelledImages, list[ImageLoadError]]:
    """Skip, up front, the files that `catdog data audit` found unusable, when its report is still current."""
    bad = current_audit_errors(images.root, images.paths)
    if not bad:
        return images, []
    keep = [i for i, path in enumerate(images.paths) if str(path) not in bad]
    skipped = [ImageLoadError(str(path), bad[str(path)], "flagged by catdog data audit") for path in images.paths if str(path) in bad]
    log(f"data: skipping {len(skipped)} files that the current audit flagged as unusable")
    kept = images.subset(keep)
    lost = set(images.class_names) - {kept.class_names[label] for label in kept.labels}
    if lost:
        raise DataError(f"every image of class(es) {sorted(lost)} is unusable according to the audit")
    return kept, skipped


def _drop_excluded_files(images: LabelledImages, list_file: str, log) -> LabelledImages:
    """Leave out the photos `--exclude` lists (e.g. likely label errors from `catdog data issues`)."""
    kept, dropped, unmatched = exclude_listed(images, list_file)
    log(f"data: leaving out {len(dropped)} files listed in {list_file}"
        + (f" ({len(unmatched)} listed paths are not in the data, e.g. {unmatched[0]})" if unmatched else ""))
    return kept


def _load_resume(run_dir: Path, config: TrainConfig) -> tuple[TrainConfig, dict]:
    checkpoint = run_dir / LAST_CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise ValueError(f"{run_dir}: nothing to resume (no {LAST_CHECKPOINT_FILE})")
    saved = json.loads((run_dir / "config.json").read_text())
    for recorded in ("resolved_strategy", "device", "processes"):
        saved.pop(recorded, None)
    saved_config = TrainConfig(**{**saved, "resume": str(run_dir), "out": str(run_dir), "progress": config.progress})
    return saved_config, load_training_state(checkpoint)
