"""The training loop both strategies share, and its building blocks.

`train_one_epoch` and `evaluate` are plain functions with explicit arguments: the head strategy (`head.py`) runs
them on batches of cached feature vectors, the finetune strategy (`finetune.py`) on batches of images, and
`catdog tune`'s trials on either. Around them: the optimizer, the learning-rate schedule, the loss with optional
class weights, the seeding that makes a resumed run replay exactly, and `Tracker` (best epoch, early stopping,
the time budget, history.csv and TensorBoard).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from catdog.runtime.data import DataError
from catdog.training.datasets import Batch
from catdog.runtime.files import write_csv_atomic
from catdog.runtime.images import ImageLoadError
from catdog.training.config import HISTORY_COLUMNS, TrainConfig

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


def build_loss_function(config: TrainConfig, labels: list[int], num_classes: int) -> nn.Module:
    weight = class_weights(labels, num_classes) if config.class_balance == "weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def sampling_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    if config.class_balance != "sampler":
        return None
    return class_weights(labels.tolist(), num_classes)[labels].double()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()), "python": repr(random.getstate())}


# ---------------------------------------------------------------- the run's bookkeeping


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_csv_atomic(run_dir / "history.csv", HISTORY_COLUMNS, [[row[c] for c in HISTORY_COLUMNS] for row in history])


class Tracker:
    """Best-epoch keeping, early stopping, the time budget, history.csv and TensorBoard, in one place.
    `write_files=False` (ranks other than 0 of a distributed run) keeps the same bookkeeping without writing."""

    def __init__(self, config: TrainConfig, run_dir: Path, resume_state: dict | None, deadline: float | None,
                 write_files: bool = True):
        # Imported here: tensorboard adds over a second to start-up, and only a training run writes its logs.
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
            write_history(self.run_dir, self.history)
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
