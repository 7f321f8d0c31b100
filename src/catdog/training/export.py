"""`catdog export`: a run (or the built-in cat/dog model) as one deployable ONNX file. Training layer (torch).

The exported file is what predict and serve run without torch (`catdog.runtime.predict.load_model_file`). It holds:
- the network, with three outputs (`DeployableNetwork`): "logits"; "features", the pooled penultimate vector
  (what the head sees); and, for networks whose head is linear on average-pooled convolutional features (the
  EfficientNets, ResNets and the built-in model), "class_maps": each class's Grad-CAM map;
- for a run trained with taught "neither" examples (`catdog train --neither DIR`, `neither.py`), three more
  outputs: "neither_score", the examples' head's decision value; "neither_distance", the distance to the nearest
  example; and "nearest_neither", its index (its name is in the metadata, `neither_files`); the rule's thresholds
  are in the metadata too, so the file alone refuses what the run refuses;
- in its metadata: the run's `meta.json` (class names, preprocessing, temperature, mirror-view threshold, the
  "neither" margin and examples), where a heatmap cell looks in the input (`heatmap_offset`), and the digest of the
  weights it came from.

Why Grad-CAM can live inside the file: Grad-CAM weighs the channels of the last convolutional map A by the spatial
mean of the gradient of the class's score (Selvaraju et al., 2017). When the score depends on A only through its
spatial average p (global average pooling), that gradient is the same at every position, d score/d p divided by
h*w, so the map is ReLU(sum_k (d score/d p_k) A_k): class activation mapping (Zhou et al., 2016) with the
gradient as weights, which the graph computes in closed form with no backward pass. The explained score is the
class's log-odds (its logit minus the log-sum-exp of the others), not its probability: a confidently predicted
class has a probability gradient of almost exactly zero, which would give empty maps for exactly the photos one
most wants explained.

A parity check runs after every export: the file's probabilities must match PyTorch's to 1e-4.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catdog.training.config import ExportConfig
from catdog.runtime.version import __version__
from catdog.training.checkpoint import load_model
from catdog.runtime.files import atomic_path, default_cache_dir, settings_digest
from catdog.runtime.images import ImageLoadError, load_image
from catdog.training.models import (
    IMAGENET_CAT_CLASSES,
    IMAGENET_DOG_CLASSES,
    ZERO_TRAINING_BACKBONE,
    ZERO_TRAINING_MODEL_NAME,
    ImageNetCatDogClassifier,
    SimpleCNNBackbone,
    create_zero_training_model,
    zero_training_preprocess,
)
from catdog.runtime.inference import session_options
from catdog.runtime.model_file import MODEL_FORMAT, open_run
from catdog.runtime.predict import ZERO_TRAINING_STRATEGY, Predictor
from catdog.runtime.runs import NEITHER_FILE, RunError, weights_digest
from catdog.training.neither import TaughtNeither
from catdog.training.ood import OOD_FILE, KnnScorer
from catdog.runtime.probabilities import softmax
from catdog.runtime.runs import RunMeta
from catdog.runtime.transforms import eval_transform

# The built-in model's "neither": ImageNet gives the 123 cat and dog classes together less than 14% of its
# probability (score -log 0.14). A constant chosen once on the shared photos (benchmarks/ood_research.py; chosen
# for Lite0 at 320 px, kept for Lite2 at 300 px): 1.5% of the 6,000 pet photos refused, 0.9% of not-pets and 2.5%
# of leopards accepted. Not lower: a photo the network knows nothing about spreads its probability almost evenly,
# which puts 123/1000 = 12.3% on the pet classes, and not-pets crowd just above that.
BUILTIN_OOD_THRESHOLD = -math.log(0.14)
PARITY_TOLERANCE = 1e-4


class ExportParityError(RuntimeError):
    """The exported model's probabilities differ from PyTorch's by more than the tolerance."""


# ---------------------------------------------------------------- the network as it is exported


class DeployableNetwork(nn.Module):
    """images -> (logits, features, class_maps): a catdog model with the outputs prediction, the out-of-distribution
    score and heatmaps need. `has_class_maps` is False for networks without a convolutional map under an average
    pool (transformers, for instance); they export logits and features only."""

    def __init__(self, model: nn.Module, ood_score: nn.Module | None = None, neither: nn.Module | None = None):
        super().__init__()
        self.model = model.eval()
        network = model.imagenet_model if isinstance(model, ImageNetCatDogClassifier) else model.backbone
        self.has_class_maps = _average_pooled_convolutional(network)
        # The out-of-distribution score: a run's (`ood.KnnScore` on the features), or the built-in model's own.
        self.ood_score = ood_score
        self.has_ood_score = ood_score is not None or isinstance(model, ImageNetCatDogClassifier)
        # The taught "neither" examples (`neither.TaughtNeitherScore` on the same features), beside a run's own score.
        self.neither = neither if ood_score is not None else None

    @property
    def output_names(self) -> tuple[str, ...]:
        return (("logits", "features") + (("class_maps",) if self.has_class_maps else ())
                + (("ood_score",) if self.has_ood_score else ())
                + (("neither_score", "neither_distance", "nearest_neither") if self.neither is not None else ()))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map [N, C, h, w] (Grad-CAM's layer)."""
        network = self.model.imagenet_model if isinstance(self.model, ImageNetCatDogClassifier) else self.model.backbone
        if isinstance(network, SimpleCNNBackbone):
            return network.features[:8](images)
        if hasattr(network, "forward_features"):  # timm
            return network.forward_features(images)
        x = network.maxpool(network.relu(network.bn1(network.conv1(images))))  # torchvision ResNet
        return network.layer4(network.layer3(network.layer2(network.layer1(x))))

    def forward(self, images: torch.Tensor):
        outputs = self._class_outputs(images)
        if self.ood_score is not None:
            outputs += (self.ood_score(outputs[1]),)
            if self.neither is not None:
                outputs += tuple(self.neither(outputs[1]))
        elif self.has_ood_score:  # the built-in model: -log of the probability ImageNet gives the pet classes
            group_sizes = torch.tensor([len(IMAGENET_CAT_CLASSES), len(IMAGENET_DOG_CLASSES)], dtype=torch.float32)
            outputs += (-torch.logsumexp(outputs[0] + group_sizes.log(), dim=1),)
        return outputs

    def _class_outputs(self, images: torch.Tensor):
        """(logits, features) and, where the network allows, class_maps."""
        if not self.has_class_maps:
            features = self.model.backbone(images)
            return self.model.head(features), features
        if isinstance(getattr(self.model, "backbone", None), SimpleCNNBackbone):
            return self._simple_cnn_outputs(images)
        feature_map = self.feature_map(images).float()
        features = feature_map.mean(dim=(2, 3))
        if isinstance(self.model, ImageNetCatDogClassifier):
            logits, jacobian = _cat_dog_logits_and_jacobian(self.model.imagenet_model, features)
        else:
            logits = self.model.head(features)
            jacobian = self.model.head.weight.unsqueeze(0)  # [1, classes, C]: the same for every image
        gradients = _log_odds_gradients(logits, jacobian)  # [N, classes, C]
        class_maps = torch.relu(torch.einsum("nkc,nchw->nkhw", gradients, feature_map))
        return logits, features, class_maps


    def _simple_cnn_outputs(self, images: torch.Tensor):
        """The tutorial's network: max-pool, 7x7 average pool and a dense ReLU layer lie between its last
        convolutional map A (the third ReLU) and the head, so the gradient is not the same at every position. Its
        spatial sum, all Grad-CAM needs, is still closed-form: a max-pool routes each cell's gradient to one
        position and an average pool spreads each bin's over the bin's cells, so the gradient summed over A's
        positions is the gradient at the 7x7 map summed over its bins, and that is W_dense^T (relu'(z) * g)."""
        backbone = self.model.backbone
        feature_map = backbone.features[:8](images)  # [N, 64, S/4, S/4]
        dense = backbone.dense[0]
        pre_activation = dense(backbone.features[8:](feature_map))
        features = torch.relu(pre_activation)
        logits = self.model.head(features)
        gradients = _log_odds_gradients(logits, self.model.head.weight.unsqueeze(0))
        at_pooled = (gradients * (pre_activation > 0).unsqueeze(1).to(gradients.dtype)) @ dense.weight  # [N, K, 64*49]
        channel_weights = at_pooled.unflatten(2, (feature_map.shape[1], -1)).sum(dim=3)
        class_maps = torch.relu(torch.einsum("nkc,nchw->nkhw", channel_weights, feature_map))
        return logits, features, class_maps


def _average_pooled_convolutional(network: nn.Module) -> bool:
    if isinstance(network, SimpleCNNBackbone):
        return True  # not average-pooled, but its maps are closed-form too (`_simple_cnn_outputs`)
    pool = getattr(network, "global_pool", None)
    if hasattr(network, "forward_features") and getattr(pool, "pool_type", None) == "avg":
        return True  # timm CNNs (EfficientNet, ResNet, ConvNeXt...) with average pooling
    return all(hasattr(network, name) for name in ("layer4", "avgpool", "conv1"))  # torchvision ResNet


def _cat_dog_logits_and_jacobian(imagenet_model: nn.Module, features: torch.Tensor):
    """The built-in model's (cat, dog) logits from pooled features (each group's mean ImageNet class log-probability,
    as `models.ImageNetCatDogClassifier`), and their Jacobian [N, 2, C]: the log of a group's probability has
    gradient E[W | the class group] - E[W | all 1000 classes] (the group sizes are constants)."""
    classifier = imagenet_model.get_classifier()
    imagenet_logits = classifier(features).float()
    everything = torch.softmax(imagenet_logits, dim=1) @ classifier.weight  # [N, C]
    logits, rows = [], []
    for group in (IMAGENET_CAT_CLASSES, IMAGENET_DOG_CLASSES):
        group_logits = imagenet_logits[:, list(group)]
        logits.append(torch.logsumexp(group_logits, dim=1) - torch.logsumexp(imagenet_logits, dim=1) - math.log(len(group)))
        rows.append(torch.softmax(group_logits, dim=1) @ classifier.weight[list(group)] - everything)
    return torch.stack(logits, dim=1), torch.stack(rows, dim=1)


def _log_odds_gradients(logits: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """d/dfeatures of each class's log-odds, logit_c - logsumexp(other logits): J_c - sum_j softmax_others(j) J_j.
    jacobian: [N or 1, classes, C] (broadcast, so the batch dimension stays dynamic in the exported graph)."""
    classes = logits.shape[1]
    # A constant in the graph (ONNX Runtime has no boolean EyeLike): row c masks class c out.
    others = torch.from_numpy(np.eye(classes, dtype=bool)).to(logits.device)
    weights = torch.softmax(logits.unsqueeze(1).masked_fill(others.unsqueeze(0), float("-inf")), dim=2)  # [N, c, j]
    return jacobian - weights @ jacobian


def heatmap_offset(network: DeployableNetwork, input_size: int) -> tuple[float, float]:
    """(rows, columns) in input pixels from where upsampling puts a feature-map cell to where the cell looks.

    Upsampling a map of h cells to S pixels puts cell i at (i + 0.5) * S / h, but with symmetric padding a chain of
    stride-2 convolutions centres cell i on input pixel i * stride: (stride - 1) / 2 pixels up and to the left
    (15.5 pixels for EfficientNet and ResNet at stride 32, half a cell). Measured, not assumed: the input gradient
    of the middle cell's channels is the cell's effective receptive field, and its centre of mass is where the
    cell looks. Stored in the exported file, since the runtime has no gradients to measure it with.
    """
    if not network.has_class_maps:
        return 0.0, 0.0
    generator = torch.Generator().manual_seed(0)
    images = (0.1 * torch.randn(1, 3, input_size, input_size, generator=generator)).requires_grad_(True)
    with torch.enable_grad():
        features = network.feature_map(images)
        rows, columns = features.shape[-2:]
        features[0, :, rows // 2, columns // 2].sum().backward()
    weights = images.grad[0].abs().sum(dim=0).double()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        return 0.0, 0.0
    positions = torch.arange(input_size, dtype=torch.float64) + 0.5  # pixel centres
    centre_row = float((weights.sum(dim=1) * positions).sum() / weights.sum())
    centre_column = float((weights.sum(dim=0) * positions).sum() / weights.sum())
    return centre_row - (rows // 2 + 0.5) * input_size / rows, centre_column - (columns // 2 + 0.5) * input_size / columns


def export_onnx_module(module: nn.Module, path: str | os.PathLike, input_size: int,
                       output_names: tuple[str, ...] = ("logits",), metadata: dict[str, str] | None = None) -> Path:
    """Write `module` as ONNX with a dynamic batch dimension; input "images" [N, 3, S, S] float32."""
    import onnx  # the ONNX package is needed to write metadata into the file

    path = Path(path)
    module = module.eval().cpu()
    example = torch.zeros(2, 3, input_size, input_size)
    dynamic_axes = {name: {0: "batch"} for name in ("images", *output_names)}
    with atomic_path(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter: quick, and it covers every backbone catdog ships.
            with native_stdout_silenced():
                torch.onnx.export(module, (example,), str(temporary), input_names=["images"], output_names=list(output_names),
                                  dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
        except Exception:
            # e.g. adaptive pooling to a size that does not divide the input (simple_cnn at small sizes):
            # the torch.export-based exporter handles it.
            torch.onnx.export(module, (example,), str(temporary), input_names=["images"], output_names=list(output_names),
                              dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=18,
                              dynamo=True, external_data=False, verbose=False)
        model = onnx.load(str(temporary))
        store_exact_half_precision(model)
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(temporary))
    return path


def store_exact_half_precision(model, min_elements: int = 1 << 20) -> None:
    """Store large float32 weights that float16 holds exactly (the out-of-distribution bank, which the run keeps as
    float16 and the exporter writes out as float32: 24.6 of a default run's 43.8 MB) as float16, each behind a Cast
    back to float32 under its old name. Lossless by construction; ONNX Runtime folds the Casts when it loads the
    file, so it computes as before."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    for initializer in list(graph.initializer):
        if initializer.data_type != TensorProto.FLOAT or int(np.prod(initializer.dims)) < min_elements:
            continue
        values = numpy_helper.to_array(initializer)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        graph.initializer.remove(initializer)
        graph.initializer.append(numpy_helper.from_array(half, f"{initializer.name}.float16"))
        graph.node.insert(0, helper.make_node("Cast", [f"{initializer.name}.float16"], [initializer.name], to=TensorProto.FLOAT,
                                              name=f"{initializer.name}.to_float32"))


@contextlib.contextmanager
def native_stdout_silenced():
    """Standard output closed at the file-descriptor level for a moment. torch's TorchScript exporter switches its
    C++ log on whatever it was asked (`setup_onnx_logging` tests the function `_jit_is_onnx_log_enabled` itself,
    always true) and, when it fails over to the other exporter, prints the whole graph to standard output."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def model_file_metadata(meta: RunMeta, offset: tuple[float, float], weights_sha1: str = "") -> dict[str, str]:
    """What `predict.load_model_file` reads back (and plain fields other tools can read)."""
    return {"catdog_format": MODEL_FORMAT, "catdog_meta": json.dumps(meta.to_dict()), "heatmap_offset": json.dumps(list(offset)),
            "weights_sha1": weights_sha1, "catdog_version": __version__, "class_names": json.dumps(meta.class_names),
            "preprocess": json.dumps(meta.preprocess.to_dict()), "temperature": str(meta.temperature),
            "neither_examples": str(meta.taught_neither)}


def builtin_model() -> tuple[nn.Module, RunMeta]:
    """The zero-training cat/dog model (ImageNet's cat and dog classes) and its metadata."""
    model, preprocess = create_zero_training_model(ZERO_TRAINING_BACKBONE)
    return model, RunMeta(ZERO_TRAINING_MODEL_NAME, ["cat", "dog"], preprocess, 1.0, ZERO_TRAINING_STRATEGY,
                          ood_method="imagenet", ood_threshold=BUILTIN_OOD_THRESHOLD)


def load_exportable(run: str | None) -> tuple[DeployableNetwork, RunMeta]:
    """(network as exported, metadata) of a run, or of the built-in model when `run` is empty."""
    if not run:
        model, meta = builtin_model()
        return DeployableNetwork(model), meta
    model, meta = load_model(run)
    scorer = KnnScorer.load(Path(run) / OOD_FILE) if meta.ood_method == "knn" and (Path(run) / OOD_FILE).is_file() else None
    taught = None
    if scorer is not None and meta.neither_margin is not None:
        if not (Path(run) / NEITHER_FILE).is_file():
            raise RunError(f"{run}: meta.json has taught \"neither\" examples but {NEITHER_FILE} is missing")
        taught = TaughtNeither.load(Path(run) / NEITHER_FILE).module()
    return DeployableNetwork(model, scorer.module() if scorer else None, taught), meta


def write_model_file(network: DeployableNetwork, meta: RunMeta, out: Path, weights_sha1: str = "",
                     parity_images: torch.Tensor | None = None) -> float:
    """Export `network` to `out` (atomically) and check its probabilities (and out-of-distribution scores) against
    PyTorch's; return the largest probability difference. Nothing is left at `out` when a check fails."""
    import onnxruntime  # the parity check runs the file as predict will

    offset = heatmap_offset(network, meta.preprocess.input_size)
    batch = parity_images if parity_images is not None else random_images(meta.preprocess.input_size, 4)
    with torch.inference_mode():
        reference_outputs = dict(zip(network.output_names, network(batch)))
    reference = torch.softmax(reference_outputs["logits"].float() / meta.temperature, dim=1).numpy()
    staging = out.with_name(f".{out.name}.staging")
    try:
        export_onnx_module(network, staging, meta.preprocess.input_size, network.output_names,
                           model_file_metadata(meta, offset, weights_sha1))
        session = onnxruntime.InferenceSession(str(staging), session_options(), providers=["CPUExecutionProvider"])
        if json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) != meta.class_names:
            raise ExportParityError("class names did not survive the export")
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        difference = check_parity(reference, softmax(logits / meta.temperature), f"ONNX export of {meta.model_name}")
        if network.has_ood_score:
            (scores,) = session.run(["ood_score"], {"images": batch.numpy()})
            check_parity(reference_outputs["ood_score"].numpy(), scores, f"ONNX export of {meta.model_name}'s out-of-distribution score")
        if network.neither is not None:
            head, distances, nearest = session.run(["neither_score", "neither_distance", "nearest_neither"], {"images": batch.numpy()})
            check_parity(reference_outputs["neither_score"].numpy(), head,
                         f"ONNX export of {meta.model_name}'s head of the taught \"neither\" examples")
            check_parity(reference_outputs["neither_distance"].numpy(), distances,
                         f"ONNX export of {meta.model_name}'s distance to the taught \"neither\" examples")
            check_nearest_parity(network.neither, reference_outputs["features"], reference_outputs["nearest_neither"].numpy(),
                                 nearest, f"ONNX export of {meta.model_name}'s nearest taught example")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(out)
    finally:
        if staging.exists():
            staging.unlink()
    return difference


def random_images(input_size: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 3, input_size, input_size, generator=generator) * 4 - 2


def parity_batch(run_dir: Path | None, preprocess, count: int) -> torch.Tensor:
    """Real images from the run's validation split when they are still on disk, else seeded random pixels."""
    transform = eval_transform(preprocess)
    arrays = []
    split_path = run_dir / "split.json" if run_dir else None
    if split_path is not None and split_path.is_file():
        split = json.loads(split_path.read_text())
        for relative in split.get("val", [])[: count * 2]:
            try:
                arrays.append(transform(load_image(Path(split["root"]) / relative)))
            except ImageLoadError:
                continue
            if len(arrays) == count:
                break
    if not arrays:
        return random_images(preprocess.input_size, count)
    return torch.from_numpy(np.stack(arrays))


def check_nearest_parity(bank: nn.Module, features: torch.Tensor, reference: np.ndarray, exported: np.ndarray, what: str) -> None:
    """The exported file's nearest taught example is PyTorch's, or one as near (a tie within the tolerance)."""
    with torch.inference_mode():
        unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        if bank.projection is not None:
            unit = unit @ bank.projection
        similarity = (unit @ bank.bank.float().t()).numpy()
    rows = np.arange(len(reference))
    gap = np.abs(similarity[rows, reference] - similarity[rows, np.asarray(exported, dtype=np.int64)])
    if exported.shape != reference.shape or not (gap <= PARITY_TOLERANCE).all():
        raise ExportParityError(f"{what}: another example than PyTorch's for {int((gap > PARITY_TOLERANCE).sum())} images")


def check_parity(reference: np.ndarray, exported: np.ndarray, what: str) -> float:
    difference = float(np.abs(reference - exported).max())
    if not difference <= PARITY_TOLERANCE:
        raise ExportParityError(f"{what}: largest probability difference {difference:.2e} exceeds {PARITY_TOLERANCE:.0e}")
    return difference


def export_run_to_cache(run: str, digest: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The export of `run`, whose files' digest is `digest` (`runs.weights_digest`), kept in the cache
    (`<cache>/models/`) and made on first use. `model_file.open_run` calls it for a run without a current
    model.onnx: the one place that decides which file a run predicts with."""
    path = Path(cache_dir or default_cache_dir()) / "models" / f"run-{digest[:20]}-catdog{__version__}.onnx"
    if not path.is_file():
        network, meta = load_exportable(run)
        write_model_file(network, meta, path, digest)
    return path


def builtin_model_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """The built-in cat/dog model's export, kept in the cache and made on first use. The preprocessing's digest is in
    the name: a change to it (the noise filter, say) is never served from an old file."""
    settings = settings_digest(zero_training_preprocess().to_dict(), 10)
    name = f"builtin-{ZERO_TRAINING_BACKBONE}-{settings}-torch{torch.__version__}-catdog{__version__}.onnx"
    path = Path(cache_dir or default_cache_dir()) / "models" / name
    if not path.is_file():
        network, meta = load_exportable(None)
        write_model_file(network, meta, path)
    return path


def open_run_with_export(run: str, cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                         device: str = "cpu", ood_keep: float | None = None) -> Predictor:
    """`model_file.open_run` with this layer's export: the run's current model.onnx, else its export in the cache."""
    return open_run(run, export_run_to_cache, cache_dir, threads, device, ood_keep)


# ---------------------------------------------------------------- the command


def run_export(config: ExportConfig, log=print) -> Path:
    run_dir = Path(config.run) if config.run else None
    digest = weights_digest(config.run) if config.run else ""
    network, meta = load_exportable(config.run)
    suffix = ".onnx" if config.format == "onnx" else ".torchscript.pt"
    out = Path(config.out) if config.out else (run_dir / f"model{suffix}" if run_dir else Path(f"catdog-builtin{suffix}"))
    batch = parity_batch(run_dir, meta.preprocess, config.parity_images)
    if config.format == "onnx":
        difference = write_model_file(network, meta, out, digest, batch)
    else:
        difference = write_torchscript(network.model, meta, out, batch)
    log(f"exported {out} ({config.format}); parity on {len(batch)} images: max |dp| = {difference:.2e}")
    return out


def write_torchscript(model: nn.Module, meta: RunMeta, out: Path, batch: torch.Tensor) -> float:
    """The PyTorch network alone (logits), traced, with the metadata as extra files; parity-checked."""
    with torch.inference_mode():
        reference = torch.softmax(model(batch) / meta.temperature, dim=1).numpy()
    staging = out.with_name(f".{out.name}.staging")
    try:
        traced = torch.jit.trace(model.eval(), batch[:2])
        torch.jit.save(traced, str(staging), _extra_files=model_file_metadata(meta, (0.0, 0.0)))
        with torch.inference_mode():
            logits = torch.jit.load(str(staging)).eval()(batch).numpy()
        difference = check_parity(reference, softmax(logits / meta.temperature), f"torchscript export of {meta.model_name}")
        staging.replace(out)
    finally:
        if staging.exists():
            staging.unlink()
    return difference
