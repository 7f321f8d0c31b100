"""Training: `catdog train`.

Two strategies share one loop (`train_one_epoch` + `evaluate`, plain functions with explicit arguments), each in
the file named after it:
- "head" (`train_head.py`): the pretrained backbone stays frozen; its features are computed once per image (and
  its mirror image) and cached (`features.py`); only the linear head trains, on the cached vectors, in seconds per
  run. This is the default on a CPU, where fine-tuning the whole network runs at a few images per second, and on
  small data sets.
- "finetune" (`train_finetune.py`): the whole network (or only the head with --freeze-backbone) trains on augmented
  images; the default on CUDA from 2,000 training images (`resolve_strategy`), with mixed precision and
  channels_last.
This file holds what both share: the config, the run directory (config.json, split.json, history.csv, TensorBoard,
resuming), the loop, the building blocks, and the `train()` entry point.
Either way the run directory ends up with one complete `Classifier` in `model.safetensors`, so evaluate, predict,
export and serve never need to know how it was trained.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from catdog.calibration import fit_temperature
from catdog.checkpoint import load_training_state, save_model
from catdog.runs import LAST_CHECKPOINT_FILE, RunMeta
from catdog.config import option
from catdog.data import DataError, LabelledImages, discover, stratified_split
from catdog.datasets import Batch
from catdog.devices import resolve_device
from catdog.distributed import barrier, init_from_environment, is_main_process, world_size
from catdog.files import write_csv_atomic, write_json_atomic
from catdog.images import ImageLoadError
from catdog.metrics import classification_metrics
from catdog.progress import progress_bar  # noqa: F401 (the strategies' progress bars)
from catdog.models import create_model, get_model_spec
from catdog.transforms import Preprocess

PRESETS = {
    # Measured on the 6,000 shared Kaggle photos, 80/20 split, 2-core CPU (BENCHMARKS.md, 2026-11-28):
    # fast: Lite0 features of each photo and its mirror image at Lite0's own 224 px: 98.7% validation accuracy,
    # log loss 0.036, 2.6 min from raw JPEGs. default: Lite2 features at 300 px instead of its own 260 (see
    # `resolve_preprocess`): 99.3%, log loss 0.019, 6.3 min. Both validate and predict with mirror-image averaging;
    # a second run over the same photos reuses the cached features (16 s).
    "fast": {"model": "efficientnet_lite0", "flip": True, "feature_image_size": 0},
    "default": {"model": "efficientnet_lite2", "flip": True, "feature_image_size": 300},
}
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds", "images_per_second"]


@dataclass
class TrainConfig:
    data: str = option("", "data set: a folder (Kaggle flat, class sub-folders, PetImages) or a CSV manifest")
    out: str = option("runs/latest", "run directory to create")
    preset: str = option("default", "fast: EfficientNet-Lite0 features at 224 px; default: Lite2 features at 300 px (2.4x slower, more accurate); both with mirror images", choices=tuple(PRESETS))
    model: str = option("", "model name (see `catdog models`); empty: the preset's model")
    strategy: str = option("auto", "head: train a linear head on cached frozen features; finetune: train the network; auto: head on CPU, and on CUDA below 2,000 training images, else finetune", choices=("auto", "head", "finetune"))
    pretrained: bool = option(True, "start from ImageNet weights (offline); --no-pretrained trains from scratch")
    freeze_backbone: bool = option(False, "finetune only the head (feature extractor)")
    unfreeze: float = option(1.0, "finetune: fraction of the backbone's weights that train, counted from its output end (0: only the head; 1: all)")
    augmentation: float = option(1.0, "finetune: augmentation strength from 0 (random crops of the whole photo only) to 1 (the tutorial's crops, flips, rotation and colour jitter)")
    flip: bool | None = option(None, "head strategy: also use mirror-image features (training and test-time); default from preset")
    epochs: int = option(0, "epochs; 0: the strategy's default (head 40, finetune 10)")
    batch_size: int = option(0, "batch size, global: under torchrun split evenly among the processes; 0: the strategy's default (head 256, finetune 32)")
    lr: float = option(0.0, "peak learning rate; 0: the strategy's default (head 3e-3, finetune 3e-4, from scratch 1e-3)")
    weight_decay: float = option(1e-4, "weight decay (decoupled for AdamW)")
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "adam", "sgd"))
    scheduler: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "step", "none"))
    warmup_epochs: float = option(1.0, "linear warmup length in epochs")
    step_size: int = option(7, "step schedule: epochs between decays")
    gamma: float = option(0.1, "step schedule: decay factor")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    grad_clip: float = option(1.0, "clip the gradient norm to this value; 0 disables")
    early_stopping: int = option(8, "stop after this many epochs without a better validation loss; 0 disables")
    class_balance: str = option("none", "imbalanced data: weights (class-weighted loss) or sampler (weighted sampling)", choices=("none", "weights", "sampler"))
    val_fraction: float = option(0.2, "fraction of each class held out for validation")
    seed: int = option(42, "random seed (split, initialisation, shuffling, augmentation)")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    image_size: int = option(0, "input size in pixels; 0: the preset's feature size for the head strategy with the preset's model (default preset: 300), else the model's own")
    num_workers: int = option(-1, "data-loading worker processes; -1: automatic")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = option(True, "mixed precision on CUDA")
    calibrate: bool = option(True, "fit a temperature on the validation split to calibrate probabilities (never sharpening below T = 1 unless validation has >= 500 images and >= 5 errors; see calibration.py)")
    exclude: str = option("", "leave out the photos this file lists: a label_issues.csv from `catdog data issues` (its flagged rows) or a plain list of paths, one per line (like `data audit`'s quarantine.txt)", metavar="FILE")
    time_budget: float = option(0.0, "minutes for the whole run (0: no limit); head strategy: feature extraction stops in time to train the head (a tenth of the budget, at least 10 s) on the photos it reached, and a rerun continues from the cache; training stops after the last epoch that fits")
    cache_dir: str = option("", "feature and ONNX cache folder; empty: $CATDOG_CACHE or ~/.cache/catdog")
    resume: str = option("", "run directory of an interrupted run to continue from its last complete epoch", metavar="RUN")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        if not self.data and not self.resume:
            raise ValueError("--data is required")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        self.model = self.model or preset["model"]
        get_model_spec(self.model)  # fails early on an unknown name, listing the valid ones
        if self.flip is None:
            self.flip = preset["flip"]
        if not get_model_spec(self.model).pretrained_by_default:
            self.pretrained = False
        for name in ("epochs", "batch_size", "step_size", "early_stopping", "image_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.time_budget < 0:
            raise ValueError("lr, weight_decay, grad_clip and time_budget must not be negative")
        if not (0.0 <= self.unfreeze <= 1.0 and 0.0 <= self.augmentation <= 1.0):
            raise ValueError("unfreeze and augmentation must be between 0 and 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be between 0 and 1")


def resolve_preprocess(config: TrainConfig, strategy: str) -> Preprocess:
    """The model's preprocessing at the input size this run uses.

    Frozen features are taken at a larger size than the backbone was trained at: ImageNet training's random
    resized crops show objects larger than a centre crop of the same size does, so at test time a frozen network
    sees objects at the scale it learned from a larger input (the "train-test resolution discrepancy", Touvron et
    al. 2019, FixRes). Lite2 features at 300 px instead of its 260 px, on the shared photos: 99.33% instead of
    99.17% on catdog's split (seed 42), and at least as accurate on each of six other splits (mean 99.24% against
    99.08%; log loss 0.0240 against 0.0254), for 1.3x the extraction time (BENCHMARKS.md). Fine-tuning trains at
    the model's own size.
    """
    spec = get_model_spec(config.model)
    size = config.image_size
    preset = PRESETS[config.preset]
    if not size and strategy == "head" and config.model == preset["model"]:
        size = preset["feature_image_size"]
    return replace(spec.preprocess, input_size=size) if size else spec.preprocess


# On CUDA, fine-tuning the whole network pays once there are a few thousand training images; below that a linear
# head on frozen features is as accurate or better, in seconds (the usual transfer-learning advice for small data
# sets of ImageNet-like photos; the CUDA check of 2026-11-27 on 1,600 training photos: head 98.5%, two epochs of
# fine-tuning 97.75%). On a CPU the head is the path at every size: fine-tuning runs at a few images per second.
FINETUNE_FROM_TRAIN_IMAGES = 2000


def resolve_strategy(config: TrainConfig, device: torch.device, train_images: int) -> str:
    if config.strategy != "auto":
        if config.strategy == "head" and not config.pretrained:
            raise ValueError("the head strategy needs a pretrained backbone; use --strategy finetune")
        return config.strategy
    if not config.pretrained:
        return "finetune"
    return "finetune" if device.type != "cpu" and train_images >= FINETUNE_FROM_TRAIN_IMAGES else "head"


def strategy_defaults(config: TrainConfig, strategy: str) -> TrainConfig:
    """Fill the 0 placeholders with what works for the chosen strategy, so config.json records what was used."""
    if strategy == "head":
        defaults = {"epochs": 40, "batch_size": 256, "lr": 3e-3}
    else:
        defaults = {"epochs": 10, "batch_size": 32, "lr": 3e-4 if config.pretrained else 1e-3}
    defaults["image_size"] = resolve_preprocess(config, strategy).input_size
    return replace(config, **{key: value for key, value in defaults.items() if not getattr(config, key)})


# ---------------------------------------------------------------- the loop


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float
    errors: list[ImageLoadError]


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_function: nn.Module,
    device: torch.device,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> EpochResult:
    model.train()
    started = time.perf_counter()
    loss_sum, correct, seen, errors = 0.0, 0, 0, []
    for batch in batches:
        errors.extend(batch.errors)
        if not len(batch.labels):
            continue  # every image in this batch failed to load; they are reported, training goes on
        images = batch.images.to(device, non_blocking=True)
        if images.dim() == 4 and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = loss_function(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()  # per-step schedule: warmup and cosine are smooth within an epoch
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        if progress:
            progress(len(labels), loss_sum / seen, correct / seen)
    return EpochResult(loss_sum / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - started, errors)


@torch.inference_mode()
def predict_logits(model: nn.Module, batches: Iterable[Batch], device: torch.device, amp_dtype: torch.dtype | None = None):
    """Logits, labels and dataset indices for every loadable sample. A batch of shape [B, V, ...] holding V views
    of each sample (original and flipped features) averages the logits over the views (test-time augmentation)."""
    model.eval()
    all_logits, all_labels, all_indices, errors = [], [], [], []
    for batch in batches:
        errors.extend(batch.errors)
        if not len(batch.labels):
            continue
        images = batch.images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
        if logits.dim() == 3:
            logits = logits.mean(dim=1)
        all_logits.append(logits.cpu())
        all_labels.append(batch.labels)
        all_indices.append(batch.indices)
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), errors
    return torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_indices), errors


def evaluate(model: nn.Module, batches: Iterable[Batch], loss_function: nn.Module, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    logits, labels, _, _ = predict_logits(model, batches, device, amp_dtype)
    loss, accuracy = score_logits(logits, labels, loss_function)
    return loss, accuracy, logits, labels


def score_logits(logits: torch.Tensor, labels: torch.Tensor, loss_function: nn.Module) -> tuple[float, float]:
    """Validation loss and accuracy of a set of logits."""
    if not len(labels):
        raise DataError("no validation image could be loaded")
    loss = loss_function(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


# ---------------------------------------------------------------- building blocks


def build_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)


def build_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear warmup, then cosine to zero, step decay, or constant."""
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    total_steps = max(1, config.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if config.scheduler == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.scheduler == "step":
            return config.gamma ** ((step // steps_per_epoch) // config.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def epoch_seed(seed: int, epoch: int) -> int:
    """The one seed of an epoch's randomness, from (seed, epoch) alone, so a resumed run replays exactly."""
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation randomness derived from (seed, epoch) alone, so a resumed run replays exactly."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed the global generators (dropout, augmentation without workers) from (seed, epoch), so epoch N draws
    the same numbers whether or not the run was interrupted before it."""
    seed_everything(epoch_seed(seed, epoch))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



# ---------------------------------------------------------------- the command


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

    images = discover(config.data, config.layout)
    images, audit_skipped = _drop_files_a_current_audit_flagged(images, log)
    if config.exclude:
        images = _drop_excluded_files(images, config.exclude, log)
    train_indices, val_indices = stratified_split(images.labels, config.val_fraction, config.seed)
    train_images, val_images = images.subset(train_indices), images.subset(val_indices)
    strategy = resolve_strategy(config, device, len(train_images))
    config = strategy_defaults(config, strategy)
    seed_everything(config.seed)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {**asdict(config), "resolved_strategy": strategy, "device": str(device),
                                                    "processes": world_size()})
        write_json_atomic(run_dir / "split.json", {
            "data": str(Path(config.data).resolve()), "root": str(images.root.resolve()), "layout": images.layout,
            "seed": config.seed, "val_fraction": config.val_fraction, "class_names": images.class_names,
            "train": train_images.relative_paths(), "val": val_images.relative_paths(),
        })
    log(f"data: {len(images)} images in {images.layout} layout, classes {images.class_counts()}; "
        f"train {len(train_images)}, val {len(val_images)}; strategy {strategy} on {device}"
        + (f" x {world_size()} processes" if world_size() > 1 else ""))
    if images.ignored:
        log(f"data: {len(images.ignored)} files not taken as images (e.g. {images.ignored[0][0]}: {images.ignored[0][1]})")

    preprocess = resolve_preprocess(config, strategy)
    model = create_model(config.model, len(images.class_names), pretrained=config.pretrained,
                         freeze_backbone=config.freeze_backbone or strategy == "head")
    # Imported here: the strategy modules build on this one (config, loop, tracker), so importing them at the top
    # would be circular.
    from catdog.train_finetune import finetune
    from catdog.train_head import train_head

    if strategy == "head":
        outcome = train_head(config, model, preprocess, train_images, val_images, device, run_dir, resume_state, deadline, log)
    else:
        outcome = finetune(config, model, preprocess, train_images, val_images, device, run_dir, resume_state, deadline, log)
    if main:
        result = _finish_run(config, run_dir, model, preprocess, strategy, images.class_names, outcome, audit_skipped, started, log)
    barrier()  # the run directory is complete before any rank returns
    if not main:  # the other ranks return the run rank 0 wrote (the run directory is on a shared file system)
        from catdog.runs import read_meta

        result = TrainResult(run_dir, read_meta(run_dir), [], audit_skipped, time.perf_counter() - started)
    return result


def _finish_run(config: TrainConfig, run_dir: Path, model: nn.Module, preprocess: Preprocess, strategy: str,
                class_names: list[str], outcome, audit_skipped: list[ImageLoadError], started: float, log) -> TrainResult:
    """Calibrate on the validation logits, save the model with its metrics, list the skipped files."""
    history, skipped, val_logits, val_labels = outcome
    skipped = audit_skipped + skipped
    val_view_logits = val_logits if val_logits.dim() == 3 else None  # head strategy: [images, views, classes]
    if val_view_logits is not None:
        val_logits = val_view_logits.mean(dim=1)
    temperature = fit_temperature(val_logits, val_labels) if config.calibrate else 1.0
    probabilities = torch.softmax(val_logits / temperature, dim=1).numpy()
    metrics = classification_metrics(val_labels.numpy(), probabilities, class_names)
    mirror_below = None
    if val_view_logits is not None and val_view_logits.shape[1] == 2:
        from catdog.probabilities import choose_mirror_threshold

        mirror_below = choose_mirror_threshold(val_view_logits.numpy(), val_labels.numpy(), temperature, log)
    meta = RunMeta(config.model, class_names, preprocess, temperature, strategy, strategy == "head" and bool(config.flip),
                   {key: metrics[key] for key in ("accuracy", "log_loss", "roc_auc", "macro_f1") if key in metrics},
                   mirror_below)
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


def _drop_files_a_current_audit_flagged(images: LabelledImages, log) -> tuple[LabelledImages, list[ImageLoadError]]:
    """Skip, up front, the files that `catdog data audit` found unusable, when its report is still current."""
    from catdog.audit import current_audit_errors

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
    from catdog.label_issues import exclude_listed

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


def _write_history(run_dir: Path, history: list[dict]) -> None:
    write_csv_atomic(run_dir / "history.csv", HISTORY_COLUMNS, [[row[c] for c in HISTORY_COLUMNS] for row in history])


class Tracker:
    """Best-epoch keeping, early stopping, the time budget, history.csv and TensorBoard, in one place.
    `write_files=False` (ranks other than 0 of a distributed run) keeps the same bookkeeping without writing."""

    def __init__(self, config: TrainConfig, run_dir: Path, resume_state: dict | None, deadline: float | None,
                 write_files: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.config, self.run_dir = config, run_dir
        self.history: list[dict] = list(resume_state["history"]) if resume_state else []
        self.best_loss = resume_state["best_loss"] if resume_state else float("inf")
        self.stale_epochs = resume_state["stale_epochs"] if resume_state else 0
        self.start_epoch = resume_state["epoch"] + 1 if resume_state else 0
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=self.start_epoch) if write_files else None
        self.deadline = deadline

    def record(self, epoch: int, result: EpochResult, val_loss: float, val_accuracy: float, learning_rate: float) -> bool:
        """Log the epoch; return True when it is the best so far."""
        row = {
            "epoch": epoch + 1, "train_loss": round(result.loss, 6), "train_accuracy": round(result.accuracy, 6),
            "val_loss": round(val_loss, 6), "val_accuracy": round(val_accuracy, 6),
            "learning_rate": learning_rate, "seconds": round(result.seconds, 3),
            "images_per_second": round(result.images / max(result.seconds, 1e-9), 1),
        }
        self.history.append(row)
        if self.writer is not None:
            _write_history(self.run_dir, self.history)
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second"):
                self.writer.add_scalar(key, row[key], epoch + 1)
            self.writer.flush()
        improved = val_loss < self.best_loss - 1e-6
        if improved:
            self.best_loss, self.stale_epochs = val_loss, 0
        else:
            self.stale_epochs += 1
        return improved

    def should_stop(self, epoch_seconds: float) -> str | None:
        if self.config.early_stopping and self.stale_epochs >= self.config.early_stopping:
            return f"early stopping: no better validation loss for {self.stale_epochs} epochs"
        if self.deadline is not None and time.perf_counter() + epoch_seconds > self.deadline:
            return f"time budget of {self.config.time_budget} min reached"
        return None

    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "history": self.history, "best_loss": self.best_loss, "stale_epochs": self.stale_epochs}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()), "python": repr(random.getstate())}


def build_loss_function(config: TrainConfig, labels: list[int], num_classes: int) -> nn.Module:
    weight = class_weights(labels, num_classes) if config.class_balance == "weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def sampling_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    if config.class_balance != "sampler":
        return None
    return class_weights(labels.tolist(), num_classes)[labels].double()
