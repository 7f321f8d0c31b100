"""The finetune strategy: the whole network (or only its head, with --freeze-backbone) trains on augmented images.

On CUDA with mixed precision (bf16 where supported, else fp16 with a gradient scaler) and channels_last. The best
epoch (lowest validation loss) is saved as the run's model; every epoch ends with a checkpoint to resume from.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from catdog.checkpoint import LAST_CHECKPOINT_FILE, RunMeta, load_model, save_model, save_training_state
from catdog.data import ImageFileDataset, LabelledImages, dataloader_options, default_num_workers
from catdog.images import ImageLoadError
from catdog.models import Classifier
from catdog.train import (
    TrainConfig,
    Tracker,
    build_loss_function,
    build_optimizer,
    build_scheduler,
    epoch_generator,
    evaluate,
    predict_logits,
    progress_bar,
    rng_state,
    sampling_weights,
    seed_epoch,
    train_one_epoch,
)
from catdog.transforms import Augmentation, Preprocess, eval_transform, train_transform


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
             val_images: LabelledImages, device, run_dir: Path, resume_state, deadline: float | None, log):
    workers = default_num_workers() if config.num_workers < 0 else config.num_workers
    unfreeze_backbone(model, 0.0 if config.freeze_backbone else config.unfreeze)
    augmentation = augmentation_of_strength(config.augmentation)
    train_dataset = ImageFileDataset(train_images.paths, train_images.labels, train_transform(preprocess, augmentation), preprocess.resize_size)
    val_dataset = ImageFileDataset(val_images.paths, val_images.labels, eval_transform(preprocess), preprocess.resize_size)
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
    tracker = Tracker(config, run_dir, resume_state, deadline)
    if resume_state:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    options = dataloader_options(device, workers)
    sample_weights = sampling_weights(config, torch.tensor(train_images.labels), len(train_images.class_names))
    val_loader = DataLoader(val_dataset, batch_size=config.batch_size * 2, shuffle=False, **options)
    plain_loss = nn.CrossEntropyLoss()
    skipped: dict[str, ImageLoadError] = {}
    for epoch in range(tracker.start_epoch, config.epochs):
        seed_epoch(config.seed, epoch)
        generator = epoch_generator(config.seed, epoch)
        sampler = (WeightedRandomSampler(sample_weights, len(sample_weights), generator=generator)
                   if sample_weights is not None else None)
        train_loader = DataLoader(train_dataset, batch_size=config.batch_size, shuffle=sampler is None,
                                  sampler=sampler, generator=generator, drop_last=len(train_dataset) > config.batch_size,
                                  **options)
        with progress_bar(config.progress, len(train_dataset), f"epoch {epoch + 1}/{config.epochs}") as bar:
            def show(count, loss, accuracy):
                bar.update(count)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}",
                                img_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.1f}")
            result = train_one_epoch(model, train_loader, optimizer, scheduler, loss_function, device,
                                     config.grad_clip, amp_dtype, scaler, show)
        val_loss, val_accuracy, _, _ = evaluate(model, val_loader, plain_loss, device, amp_dtype)
        skipped.update({error.path: error for error in result.errors})
        log(f"epoch {epoch + 1}: train loss {result.loss:.4f} acc {result.accuracy:.4f}, val loss {val_loss:.4f} "
            f"acc {val_accuracy:.4f}, {result.images / result.seconds:.1f} img/s")
        if tracker.record(epoch, result, val_loss, val_accuracy, scheduler.get_last_lr()[0]):
            save_model(run_dir, model, RunMeta(config.model, train_images.class_names, preprocess, 1.0, "finetune"))
        save_training_state(run_dir / LAST_CHECKPOINT_FILE, {
            **tracker.state(epoch), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state()})
        reason = tracker.should_stop(result.seconds)
        if reason:
            log(reason)
            break
    tracker.writer.close()
    best, _ = load_model(run_dir, device)
    model.load_state_dict(best.state_dict())
    val_logits, val_labels, _, errors = predict_logits(model, val_loader, device, amp_dtype)
    skipped.update({error.path: error for error in errors})
    model.cpu()
    return tracker.history, list(skipped.values()), val_logits, val_labels
