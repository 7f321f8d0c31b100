"""The choices made from a `TrainConfig` before training starts: the strategy (head or finetune), the input size,
and the strategy's default epochs, batch size and learning rate."""

from __future__ import annotations

from dataclasses import replace

import torch

from catdog.runtime.transforms import Preprocess
from catdog.training.config import PRESETS, TrainConfig
from catdog.training.models import get_model_spec


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
    return replace(spec.preprocess, input_size=size or spec.preprocess.input_size, denoise_above=config.denoise_above or None)


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
