"""The finetune strategy: the whole network (or only its head, with --freeze-backbone) trains on augmented images.

On CUDA with mixed precision (bf16 where supported, else fp16 with a gradient scaler) and channels_last. The best
epoch (lowest validation loss) is saved as the run's model; every epoch ends with a checkpoint to resume from.

Under `torchrun --nproc_per_node K -m catdog train ...` the K processes train one model with DistributedDataParallel.
`--batch-size` is the global batch: each process takes batch/K images per step and DDP averages the gradients, so
a step sees the same number of images as one process with the same settings and the learning rate needs no change.
To grow the batch with the GPUs instead, scale --lr with it (the linear scaling rule, Goyal et al. 2017, with the
warmup catdog already does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from timm.utils.distributed import distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from catdog.training.augmentation import Augmentation, train_transform
from catdog.training.checkpoint import load_model, save_model, save_training_state
from catdog.runtime.data import LabelledImages, default_num_workers
from catdog.training.datasets import ImageFileDataset, dataloader_options
from catdog.training.distributed import (
    all_gather_objects,
    barrier,
    broadcast_from_main,
    is_main_process,
    rank,
    shard_indices,
    world_size,
)
from catdog.runtime.images import ImageLoadError
from catdog.training.models import Classifier
from catdog.training.ood import KNN_BANK_SIZE
from catdog.runtime.progress import progress_bar
from catdog.runtime.runs import LAST_CHECKPOINT_FILE, RunMeta
from catdog.training.config import TrainConfig
from catdog.training.loop import (
    EpochResult,
    Tracker,
    build_loss_function,
    build_optimizer,
    build_scheduler,
    epoch_generator,
    epoch_seed,
    predict_logits,
    rng_state,
    sampling_weights,
    score_logits,
    seed_epoch,
    train_one_epoch,
)
from catdog.runtime.transforms import Preprocess, eval_transform


def unfreeze_backbone(model: Classifier, fraction: float) -> None:
    """Let the last `fraction` of the backbone's weights (by count, from the output end) train; freeze the rest.

    Layers near the output are the most specific to ImageNet and gain most from adapting; the early ones (edges,
    textures) transfer as they are. With fraction 0 the backbone is a frozen feature extractor, whose BatchNorm
    statistics stay as pretrained (`Classifier.train`).
    """
    parameters = list(model.backbone.parameters())
    budget = fraction * sum(parameter.numel() for parameter in parameters)
    unfrozen = 0
    for parameter in reversed(parameters):
        parameter.requires_grad_(unfrozen < budget)
        unfrozen += parameter.numel()
    model.backbone_frozen = fraction == 0


def augmentation_of_strength(strength: float) -> Augmentation:
    """Augmentation from 0 (random crops of the whole photo only) to 1 (the tutorial's recipe, `Augmentation()`):
    crop area, flip probability, rotation and colour jitter grow linearly."""
    full = Augmentation()
    return Augmentation(
        crop_scale=(1.0 - strength * (1.0 - full.crop_scale[0]), 1.0),
        flip=strength * full.flip,
        rotation_degrees=strength * full.rotation_degrees,
        color_jitter=tuple(strength * value for value in full.color_jitter),
    )


def finetune(config: TrainConfig, model: Classifier, preprocess: Preprocess, train_images: LabelledImages,
             val_images: LabelledImages, device, run_dir: Path, resume_state, deadline: float | None, log,
             neither_paths: Sequence[Path] = ()):
    """Train `model` in place; return (history, skipped files, validation logits, validation labels, (training
    and validation features for the out-of-distribution score, and the fine-tuned network's features of the taught
    "neither" examples with their positions in `neither_paths`, or None)).

    Under torchrun every rank runs this with the same arguments: DistributedDataParallel averages the gradients,
    `GlobalBatchSampler` (a DistributedSampler) gives each rank its slice of every global batch, validation is
    sharded and gathered, and rank 0 alone writes the run files."""
    processes = world_size()
    if config.batch_size % processes:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch; it must divide evenly among the "
                         f"{processes} processes")
    if processes > 1 and config.class_balance == "sampler":
        raise ValueError("--class-balance sampler is not supported with several processes; use --class-balance weights")
    batch_per_process = config.batch_size // processes
    main = is_main_process()
    workers = default_num_workers() if config.num_workers < 0 else config.num_workers
    unfreeze_backbone(model, 0.0 if config.freeze_backbone else config.unfreeze)
    augmentation = augmentation_of_strength(config.augmentation)
    train_dataset = ImageFileDataset(train_images.paths, train_images.labels, train_transform(preprocess, augmentation), preprocess.resize_size)
    # Validation is sharded without padding (each image on exactly one rank) and gathered, so every rank computes
    # the same metrics over each validation image once.
    val_positions = shard_indices(len(val_images))
    val_dataset = ImageFileDataset([val_images.paths[i] for i in val_positions], [val_images.labels[i] for i in val_positions],
                                   eval_transform(preprocess), preprocess.resize_size)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = None
    scaler = None
    if device.type == "cuda" and config.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_function = build_loss_function(config, train_images.labels, len(train_images.class_names)).to(device)
    optimizer = build_optimizer(model.parameters(), config)
    steps_per_epoch = math.ceil(len(train_dataset) / config.batch_size)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    tracker = Tracker(config, run_dir, resume_state, deadline, write_files=main)
    if resume_state:  # every rank loads the same checkpoint: weights, optimizer moments, schedule position
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    trained_model = model
    if processes > 1:
        # Each rank keeps its own BatchNorm running statistics (no broadcast of rank 0's at every step); they are
        # averaged over the ranks after each epoch (timm's distribute_bn), so the model is validated and saved with
        # statistics of every process's images, as one process would have them, not of rank 0's half alone.
        trained_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                broadcast_buffers=False)
    global_batches = GlobalBatchSampler(train_dataset, processes, rank(), config.seed, config.batch_size)
    options = dataloader_options(device, workers)
    sample_weights = sampling_weights(config, torch.tensor(train_images.labels), len(train_images.class_names))
    val_loader = DataLoader(val_dataset, batch_size=batch_per_process * 2, shuffle=False, **options)
    plain_loss = nn.CrossEntropyLoss()
    skipped: dict[str, ImageLoadError] = {}
    # The shuffle (GlobalBatchSampler's) and each image's augmentation are seeded by (seed, epoch) alike on every
    # rank, so K processes train on the images, augmented the same way, that one process would; dropout draws
    # (the model's own generator) differ between ranks, rank 0 keeping the one-process numbers.
    rank_seed = config.seed + 7919 * rank()
    for epoch in range(tracker.start_epoch, config.epochs):
        seed_epoch(rank_seed, epoch)
        generator = epoch_generator(rank_seed, epoch)
        train_dataset.augmentation_seed = epoch_seed(config.seed, epoch)
        global_batches.set_epoch(epoch)
        sampler = (WeightedRandomSampler(sample_weights, len(sample_weights), generator=generator)
                   if sample_weights is not None else global_batches)
        drop_last = sample_weights is not None and len(train_dataset) > config.batch_size  # GlobalBatchSampler drops its own
        train_loader = DataLoader(train_dataset, batch_size=batch_per_process, sampler=sampler, generator=generator,
                                  drop_last=drop_last, **options)
        share = len(sampler)
        with progress_bar(config.progress and main, share, f"epoch {epoch + 1}/{config.epochs}") as bar:
            def show(count, loss, accuracy):
                bar.update(count)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}",
                                img_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.1f}")
            result = train_one_epoch(trained_model, train_loader, optimizer, scheduler, loss_function, device,
                                     config.grad_clip, amp_dtype, scaler, show)
        result = combine_epoch_results(all_gather_objects(result))
        if processes > 1:
            distribute_bn(model, processes, reduce=True)
        val_logits, val_labels, _ = gather_validation_logits(model, val_loader, val_positions, device, amp_dtype)
        val_loss, val_accuracy = score_logits(val_logits, val_labels, plain_loss)
        skipped.update({error.path: error for error in result.errors})
        log(f"epoch {epoch + 1}: train loss {result.loss:.4f} acc {result.accuracy:.4f}, val loss {val_loss:.4f} "
            f"acc {val_accuracy:.4f}, {result.images / result.seconds:.1f} img/s")
        improved = tracker.record(epoch, result, val_loss, val_accuracy, scheduler.get_last_lr()[0])
        if main:
            if improved:
                save_model(run_dir, model, RunMeta(config.model, train_images.class_names, preprocess, 1.0, "finetune"))
            save_training_state(run_dir / LAST_CHECKPOINT_FILE, {
                **tracker.state(epoch), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state()})
        # Rank 0's clock decides the time budget, so every rank stops after the same epoch.
        reason = broadcast_from_main(tracker.should_stop(result.seconds))
        if reason:
            log(reason)
            break
    tracker.close()
    barrier()  # rank 0 has written the best model
    best, _ = load_model(run_dir, device)
    model.load_state_dict(best.state_dict())
    # One last pass over the validation photos gives both what calibration needs (logits) and what the
    # out-of-distribution threshold needs (the backbone's features, which the head turns into those logits).
    val_features, val_labels, errors = gather_validation_logits(model.backbone, val_loader, val_positions, device, amp_dtype)
    skipped.update({error.path: error for error in errors})
    with torch.inference_mode():
        val_logits = model.head(val_features.to(device).float()).float().cpu()
    train_features = out_of_distribution_bank_features(model, train_images, val_loader.batch_size, preprocess, device,
                                                       amp_dtype, config.seed, options)
    neither = None
    if neither_paths:  # the taught examples through the fine-tuned network, as the bank above
        neither = backbone_features(model, list(neither_paths), val_loader.batch_size, preprocess, device, amp_dtype, options)
        log(f"neither: fine-tuned features of {len(neither[1])} of {len(neither_paths)} taught examples")
    model.cpu()
    return tracker.history, list(skipped.values()), val_logits, val_labels, (train_features, val_features.numpy(), neither)


def backbone_features(model: Classifier, paths: list[Path], batch_size: int, preprocess: Preprocess, device: torch.device,
                      amp_dtype: torch.dtype | None, options: dict) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's features (the vector its head sees) of `paths`, without augmentation, shared among the ranks:
    (features of the files that loaded [usable, dim], their positions in `paths`), on every rank."""
    positions = shard_indices(len(paths))
    dataset = ImageFileDataset([paths[i] for i in positions], [0] * len(positions), eval_transform(preprocess),
                               preprocess.resize_size)
    loader = DataLoader(dataset, batch_size=batch_size, **options)
    features, _, indices, _ = predict_logits(model.backbone, loader, device, amp_dtype)
    shares = all_gather_objects((features, [positions[i] for i in indices.tolist()]))
    kept = [(share_features, share_positions) for share_features, share_positions in shares if len(share_positions)]
    if not kept:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    all_features = torch.cat([share[0] for share in kept]).float().numpy()
    all_positions = np.array([position for share in kept for position in share[1]], dtype=np.int64)
    order = np.argsort(all_positions, kind="stable")
    return all_features[order], all_positions[order]


def out_of_distribution_bank_features(model: Classifier, train_images: LabelledImages, batch_size: int,
                                      preprocess: Preprocess, device: torch.device, amp_dtype: torch.dtype | None,
                                      seed: int, options: dict) -> np.ndarray:
    """The fine-tuned backbone's features (the vector its head sees) of a seeded sample of training photos, as
    many as the out-of-distribution bank keeps: one pass without augmentation, shared among the ranks."""
    chosen = np.arange(len(train_images))
    if len(chosen) > KNN_BANK_SIZE:
        chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), KNN_BANK_SIZE, replace=False))
    positions = [int(chosen[i]) for i in shard_indices(len(chosen))]
    dataset = ImageFileDataset([train_images.paths[i] for i in positions], [train_images.labels[i] for i in positions],
                               eval_transform(preprocess), preprocess.resize_size)
    loader = DataLoader(dataset, batch_size=batch_size, **options)
    train_features, _, _ = gather_validation_logits(model.backbone, loader, positions, device, amp_dtype)
    return train_features.numpy()


class GlobalBatchSampler(DistributedSampler):
    """A DistributedSampler whose shares follow the order one process would train in: each epoch shuffles the
    training images once (seeded by seed and epoch alone, the same on every rank), cuts the order into global
    batches, and rank r takes the r-th slice of each. So step k of K processes trains on the very images of step k
    of one process (only BatchNorm's batch statistics, taken per process, and dropout draws differ), and a K-process
    run follows the one-process run. Only whole global batches are used (an incomplete last one is dropped, as
    one process drops it); a data set smaller than one batch makes one batch, split evenly. The shares are disjoint."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, global_batch: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.global_batch = global_batch
        self.per_rank = global_batch // num_replicas
        whole_batches = len(dataset) // global_batch
        self.num_samples = whole_batches * self.per_rank if whole_batches else len(dataset) // num_replicas
        self.total_size = self.num_samples * num_replicas

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, self.epoch)).tolist()
        if len(order) < self.global_batch:
            return iter(order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples])
        starts = range(0, len(order) - self.global_batch + 1, self.global_batch)
        return iter([index for start in starts
                     for index in order[start + self.rank * self.per_rank : start + (self.rank + 1) * self.per_rank]])


def combine_epoch_results(results: list[EpochResult]) -> EpochResult:
    """One epoch's figures over all ranks: losses and accuracies weighted by each rank's images, the slowest
    rank's time."""
    images = sum(result.images for result in results)
    return EpochResult(
        sum(result.loss * result.images for result in results) / max(images, 1),
        sum(result.accuracy * result.images for result in results) / max(images, 1),
        images,
        max(result.seconds for result in results),
        [error for result in results for error in result.errors],
    )


def gather_validation_logits(model: nn.Module, loader: DataLoader, positions: list[int], device: torch.device,
                             amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, list[ImageLoadError]]:
    """Logits and labels of every loadable validation image, each once and in split order, on every rank: this
    rank predicts its share (`positions` in the split), the shares are gathered and put back in order."""
    logits, labels, indices, errors = predict_logits(model, loader, device, amp_dtype)
    shares = all_gather_objects((logits, labels, [positions[i] for i in indices.tolist()], errors))
    order = torch.tensor([position for share in shares for position in share[2]], dtype=torch.long).argsort()
    non_empty = [share for share in shares if len(share[1])]
    if not non_empty:
        return logits, labels, [error for share in shares for error in share[3]]
    all_logits = torch.cat([share[0] for share in non_empty])[order]
    all_labels = torch.cat([share[1] for share in non_empty])[order]
    return all_logits, all_labels, [error for share in shares for error in share[3]]
