"""`catdog train`'s options and the choices made from them before training starts: the presets, the strategy
(head or finetune), the input size, and the strategy's default epochs, batch size and learning rate.

The bottom of the training package: the loop (`loop.py`), the strategies (`head.py`, `finetune.py`) and the
command (`catdog/train.py`) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from catdog.config import option
from catdog.models import get_model_spec
from catdog.transforms import DENOISE_ABOVE, Preprocess

PRESETS = {
    # Measured on the 6,000 shared Kaggle photos, 80/20 split, 2-core CPU (BENCHMARKS.md, 2026-11-28):
    # fast: Lite0 features of each photo and its mirror image at Lite0's own 224 px: 98.7% validation accuracy,
    # log loss 0.036, 2.6 min from raw JPEGs. default: Lite2 features at 300 px instead of its own 260 (see
    # `resolve_preprocess`): 99.3%, log loss 0.019, 6.3 min. Both validate and predict with mirror-image averaging;
    # a second run over the same photos reuses the cached features (16 s).
    # damage_views: off by default. Half a damaged copy per training photo (corruptions.py) raised the default run's
    # mean accuracy under the stronger damage from 96.96% to 97.53% but made its clean log loss worse (0.0191 ->
    # 0.0215) for about 1.2x a cold run's extraction; 1 and 2 copies add little more (97.66%, 97.70%). A linear head
    # on frozen features cannot undo sideways photos (94%) or heavy noise (96%), so the option is there
    # (`--damage-views 0.5`) but a clean photo's answer is not made worse by default (BENCHMARKS.md, "Damaged photos").
    # denoise_above: the noise filter (`transforms.DENOISE_ABOVE`) helps Lite2 at 300 px on noisy photos and hurts
    # Lite0 at 224 px (BENCHMARKS.md, "Damaged photos"), so only the default preset filters, and only with its own
    # model (another --model has it off unless --denoise-above says otherwise); 0: off.
    "fast": {"model": "efficientnet_lite0", "flip": True, "feature_image_size": 0, "damage_views": 0.0, "denoise_above": 0.0},
    "default": {"model": "efficientnet_lite2", "flip": True, "feature_image_size": 300, "damage_views": 0.0,
                "denoise_above": DENOISE_ABOVE},
}
# history.csv: one row per epoch, written by `loop.Tracker`
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
    damage_views: float | None = option(None, "head strategy: damaged copies (JPEG, thumbnail, blur, grey, dark, noise, screenshot, sideways; catdog/corruptions.py) per training photo whose features the head also trains on, for robustness to damaged photos; a fraction gives one to that share of the photos; 0: none; default from preset", metavar="N")
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
    denoise_above: float | None = option(None, "a photo whose estimated sensor noise (grey levels of 255) is above this gets a 3x3 median filter before resizing, in training and in every prediction (it travels with the run; see catdog/transforms.py); 0: off; default from preset (default: 10 with its own model, fast: off)")
    image_size: int = option(0, "input size in pixels; 0: the preset's feature size for the head strategy with the preset's model (default preset: 300), else the model's own")
    num_workers: int = option(-1, "data-loading worker processes; -1: automatic")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = option(True, "mixed precision on CUDA")
    calibrate: bool = option(True, "fit a temperature on the validation split to calibrate probabilities (never sharpening below T = 1 unless validation has >= 500 images and >= 5 errors; see calibration.py)")
    ood_keep: float = option(0.99, "\"neither\": the out-of-distribution threshold keeps this share of the validation photos (see catdog/ood.py)")
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
        if self.damage_views is None:
            self.damage_views = preset["damage_views"]
        if self.denoise_above is None:  # the filter was measured on the presets' own models only
            self.denoise_above = preset["denoise_above"] if self.model == preset["model"] else 0.0
        if not 0.0 <= self.damage_views <= 8.0:
            raise ValueError(f"damage_views must be between 0 and 8, got {self.damage_views}")
        if not get_model_spec(self.model).pretrained_by_default:
            self.pretrained = False
        for name in ("epochs", "batch_size", "step_size", "early_stopping", "image_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.time_budget < 0 or self.denoise_above < 0:
            raise ValueError("lr, weight_decay, grad_clip, time_budget and denoise_above must not be negative")
        if not (0.0 <= self.unfreeze <= 1.0 and 0.0 <= self.augmentation <= 1.0):
            raise ValueError("unfreeze and augmentation must be between 0 and 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be between 0 and 1")
        if not 0.0 < self.ood_keep <= 1.0:
            raise ValueError("ood_keep must be in (0, 1]")


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
