"""Grad-CAM: which part of a photo made the model decide (`catdog explain`, `POST /explain`, the report).

Captum's `LayerGradCam` weighs the channels of the backbone's last convolutional feature map by the gradient of the
predicted class's score and sums them (Selvaraju et al., 2017). The map is upsampled to the model's input crop and
placed where that crop lies in the photo, so the heatmap is over the photo as the user sees it.

Choices that matter:
- The explained score is the class's log-odds (its logit minus the log-sum-exp of the others), not its softmax
  probability: a confidently predicted class has a probability gradient of almost exactly zero, which would give an
  empty map for exactly the photos one most wants to explain. For two classes the log-odds is the logit difference.
- A frozen backbone (head-strategy runs, `--freeze-backbone`) has `requires_grad=False` everywhere below the head,
  so autograd would record nothing through it and there is no gradient at the feature map (the known pitfall). The
  input batch is made to require gradients, which records the whole graph without touching the model's parameters.
- Runs validated with mirror-image averaging are explained the same way: the photo and its mirror image are both
  explained for the same class and the mirrored map is flipped back and averaged in, and the probabilities are
  the averaged, temperature-scaled ones `catdog predict` reports.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from catdog.checkpoint import load_model

from catdog.runs import RunMeta, check_not_pickle
from catdog.config import option
from catdog.files import write_bytes_atomic, write_csv_atomic
from catdog.images import ImageLoadError, load_image
from catdog.models import ImageNetCatDogClassifier, SimpleCNNBackbone, ZERO_TRAINING_MODEL_NAME, create_zero_training_model
from catdog.transforms import eval_transform

OVERLAY_OPACITY = 0.5  # share of the heatmap colour in the overlay; the photo stays readable under it
OVERLAY_MAX_SIDE = 800  # overlays of larger photos are scaled down to this longer side
EXIT_SOME_FILES_FAILED = 3  # as `catdog predict`: explanations were written for every readable file


@dataclass
class Explanation:
    """The predicted class of one photo, its probabilities and where in the photo the evidence for it lies.

    heatmap: [photo height, photo width] in [0, 1], 1 at the strongest evidence; 0 outside the centre crop the model
    saw. probabilities: calibrated, one per class, in `class_names` order.
    """

    class_names: list[str]
    probabilities: np.ndarray
    heatmap: np.ndarray
    photo: Image.Image

    @property
    def label(self) -> str:
        return self.class_names[int(self.probabilities.argmax())]

    @property
    def confidence(self) -> float:
        return float(self.probabilities.max())

    def overlay(self, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
        return heatmap_overlay(self.photo, self.heatmap, max_side)

    def overlay_png(self, max_side: int = OVERLAY_MAX_SIDE) -> bytes:
        buffer = io.BytesIO()
        self.overlay(max_side).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    def _repr_png_(self) -> bytes:  # a notebook shows the overlay
        return self.overlay_png()


class ClassLogOdds(nn.Module):
    """The wrapped model's log-odds of each class: logit_c - logsumexp(logits of the other classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images).float()
        classes = logits.shape[1]
        others = ~torch.eye(classes, dtype=torch.bool, device=logits.device)  # row c: every class but c
        rest = torch.stack([torch.logsumexp(logits[:, others[c]], dim=1) for c in range(classes)], dim=1)
        return logits - rest


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the last convolutional feature map before global pooling."""
    network = model.imagenet_model if isinstance(model, ImageNetCatDogClassifier) else model.backbone
    if isinstance(network, SimpleCNNBackbone):
        return network.features[7]  # the ReLU after the third convolution, before its max-pool
    if hasattr(network, "bn2") and hasattr(network, "conv_head"):
        return network.bn2  # timm EfficientNet: conv_head -> bn2 (batch norm + activation) -> global pool
    if hasattr(network, "layer4"):
        return network.layer4  # torchvision ResNet
    raise ValueError(f"no Grad-CAM layer is known for {type(network).__name__}")


class GradCamExplainer:
    """A model, its evaluation preprocessing, class names and temperature, ready to explain photos."""

    def __init__(self, model: nn.Module, meta: RunMeta, device: torch.device | str = "cpu"):
        from captum.attr import LayerGradCam

        self.meta = meta
        self.class_names = list(meta.class_names)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.transform = eval_transform(meta.preprocess)
        self.log_odds = ClassLogOdds(self.model)
        self.layer = gradcam_layer(self.model)
        self.grad_cam = LayerGradCam(self.log_odds, self.layer)
        self.map_offset = feature_map_offset(self.model, self.layer, meta.preprocess.input_size, self.device)

    def explain(self, photo: Image.Image, tta: bool | None = None, target: int | None = None) -> Explanation:
        """Grad-CAM of `target` (default: the predicted class) for one RGB photo."""
        image = self.transform(photo)
        views = image.unsqueeze(0).to(self.device)
        with torch.no_grad():
            logits = self.model(views).float()[0]
            probabilities = torch.softmax(logits / self.meta.temperature, dim=0)
            # The mirror view exactly when `catdog predict` adds it: asked for, or as the run was validated (for
            # runs with `mirror_below`, only when the first view is less sure than that).
            mirror_below = getattr(self.meta, "mirror_below", None)
            tta = (self.meta.tta and (mirror_below is None or float(probabilities.max()) < mirror_below)) if tta is None else tta
            if tta:
                views = torch.cat([views, views.flip(-1)])
                logits = (logits + self.model(views[1:]).float()[0]) / 2
                probabilities = torch.softmax(logits / self.meta.temperature, dim=0)
        probabilities = probabilities.cpu().numpy()
        target = int(probabilities.argmax()) if target is None else target
        views.requires_grad_(True)  # gradients through a frozen backbone (see the module's docstring)
        with torch.enable_grad():
            maps = self.grad_cam.attribute(views, target=target, relu_attributions=True)  # [views, 1, h, w]
        maps = maps.detach().float()
        if tta:
            maps = (maps[:1] + maps[1:].flip(-1)) / 2
        size = self.meta.preprocess.input_size
        crop_map = nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        left, top, right, bottom = self.transform.crop_box(*photo.size)
        shift_x, shift_y = self.map_offset[1] * (right - left) / size, self.map_offset[0] * (bottom - top) / size
        box = (left + shift_x, top + shift_y, right + shift_x, bottom + shift_y)
        heatmap = place_on_photo(crop_map.cpu().numpy(), box, photo.size)
        return Explanation(self.class_names, probabilities, heatmap, photo)


def feature_map_offset(model: nn.Module, layer: nn.Module, input_size: int, device: torch.device) -> tuple[float, float]:
    """(rows, columns) in input pixels from where upsampling puts a feature-map cell to where the cell looks.

    Upsampling a map of h cells to S pixels puts cell i at (i + 0.5) * S / h, but with symmetric padding a chain of
    stride-2 convolutions centres cell i on input pixel i * stride: (stride - 1) / 2 pixels up and to the left
    (15.5 pixels for EfficientNet and ResNet at stride 32, half a cell; none for max-pool strides). Measured, not
    assumed: the input gradient of the middle cell's channels is the cell's effective receptive field, and its centre
    of mass is where the cell looks.
    """
    captured = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.update(output=output))
    generator = torch.Generator().manual_seed(0)
    images = (0.1 * torch.randn(1, 3, input_size, input_size, generator=generator)).to(device).requires_grad_(True)
    try:
        with torch.enable_grad():
            model(images)
            features = captured["output"]
            rows, columns = features.shape[-2:]
            features[0, :, rows // 2, columns // 2].sum().backward()
    finally:
        handle.remove()
    weights = images.grad[0].abs().sum(dim=0).double()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        return 0.0, 0.0
    positions = torch.arange(input_size, dtype=torch.float64, device=weights.device) + 0.5  # pixel centres
    centre_row = float((weights.sum(dim=1) * positions).sum() / weights.sum())
    centre_column = float((weights.sum(dim=0) * positions).sum() / weights.sum())
    return centre_row - (rows // 2 + 0.5) * input_size / rows, centre_column - (columns // 2 + 0.5) * input_size / columns


def place_on_photo(crop_map: np.ndarray, box: tuple[float, float, float, float], photo_size: tuple[int, int]) -> np.ndarray:
    """A map over the model's input crop, resized to the crop's box in the photo and scaled to [0, 1]."""
    width, height = photo_size
    left, top, right, bottom = (int(round(v)) for v in box)
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    heatmap = np.zeros((height, width), dtype=np.float32)
    if right > left and bottom > top:
        resized = Image.fromarray(crop_map.astype(np.float32), mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        heatmap[top:bottom, left:right] = np.maximum(np.asarray(resized), 0)
    peak = heatmap.max()
    return heatmap / peak if peak > 0 else heatmap


def heatmap_overlay(photo: Image.Image, heatmap: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The photo with the heatmap blended over it (matplotlib's "jet": blue cold, red hot)."""
    from matplotlib import colormaps

    scale = min(1.0, max_side / max(photo.size))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    pixels = np.asarray(photo.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    blended = (1 - OVERLAY_OPACITY) * pixels + OVERLAY_OPACITY * colours
    return Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def explainer_for(predictor) -> GradCamExplainer:
    """A Grad-CAM explainer of a `predict.Predictor`'s model, with a model instance of its own (the predictor may
    run ONNX Runtime, and Captum's hooks must not see the predictor's own forward passes)."""
    return GradCamExplainer(predictor.build_model(), predictor.meta, predictor.device)


def load_explainer(run: str | None, device: str = "auto") -> GradCamExplainer:
    """A run's model, or the built-in zero-training cat/dog model when `run` is empty, in PyTorch (Grad-CAM needs
    gradients, which an ONNX Runtime session does not give)."""
    from catdog.predict import ZERO_TRAINING_BACKBONE, resolve_device

    torch_device = resolve_device(device)
    if not run:
        model, preprocess = create_zero_training_model(ZERO_TRAINING_BACKBONE)
        meta = RunMeta(ZERO_TRAINING_MODEL_NAME, ["cat", "dog"], preprocess, 1.0, "zero-training")
        return GradCamExplainer(model, meta, torch_device)
    check_not_pickle(run)
    model, meta = load_model(run)
    return GradCamExplainer(model, meta, torch_device)


# ---------------------------------------------------------------- the command


@dataclass
class ExplainConfig:
    paths: list[str] = option([], "image files and/or folders (searched recursively)")
    run: str = option("", "run directory; empty: the built-in zero-training cat/dog model")
    output: str = option("explanations", "folder for <photo>.gradcam.png and explanations.csv")
    tta: bool | None = option(None, "explain the photo and its mirror image together; default: as the run was validated")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self):
        if not self.paths:
            raise ValueError("give at least one image file or folder")
        if not self.output:
            raise ValueError("--output must name a folder")


def overlay_file_names(paths: Sequence[Path]) -> list[str]:
    """`<stem>.gradcam.png` per photo; photos sharing a stem (same name in different folders) get -2, -3 ..."""
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        suffix = "" if seen[path.stem] == 1 else f"-{seen[path.stem]}"
        names.append(f"{path.stem}{suffix}.gradcam.png")
    return names


def run_explain(config: ExplainConfig, log=print) -> int:
    """Explain every readable photo; return the exit code (0, or EXIT_SOME_FILES_FAILED when some could not be read)."""
    from catdog.predict import collect_inputs

    paths, problems = collect_inputs(config.paths)
    explainer = load_explainer(config.run, config.device)
    output = Path(config.output)
    log(f"explaining {len(paths)} photos with {config.run or 'the built-in zero-training cat/dog model'}")
    started = time.perf_counter()
    header = ["path", "label", "confidence"] + [f"prob_{name}" for name in explainer.class_names] + ["overlay"]
    rows, failures = [], [(path, why) for path, why in problems]
    for path, overlay_name in zip(paths, overlay_file_names(paths)):
        try:
            photo = load_image(path)
        except ImageLoadError as error:
            failures.append((str(path), f"{error.reason}" + (f" ({error.detail})" if error.detail else "")))
            continue
        explanation = explainer.explain(photo, config.tta)
        write_bytes_atomic(output / overlay_name, explanation.overlay_png())
        rows.append([str(path), explanation.label, f"{explanation.confidence:.6f}"]
                    + [f"{p:.6f}" for p in explanation.probabilities] + [overlay_name])
    write_csv_atomic(output / "explanations.csv", header, rows)
    for path, why in failures:
        print(f"error: {path}: {why}", file=sys.stderr)
    log(f"wrote {len(rows)} Grad-CAM overlays and explanations.csv to {output} in {time.perf_counter() - started:.1f} s"
        + (f"; {len(failures)} could not be read" if failures else ""))
    return EXIT_SOME_FILES_FAILED if failures else 0
