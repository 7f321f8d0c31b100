"""Export a trained run to ONNX or TorchScript, with the class names and preprocessing inside the file, and a
parity check against PyTorch after every export."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catdog.config import option
from catdog.files import atomic_path


def export_onnx_module(module: torch.nn.Module, path: str | os.PathLike, input_size: int, output_name: str = "logits",
                       metadata: dict[str, str] | None = None) -> Path:
    """Write `module` as ONNX with a dynamic batch dimension; input "images" [N, 3, S, S] float32."""
    import onnx

    path = Path(path)
    module = with_static_same_padding(module.eval().cpu(), input_size)
    example = torch.zeros(2, 3, input_size, input_size)
    with atomic_path(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter: quick, and it covers every backbone catdog ships.
            torch.onnx.export(
                module, (example,), str(temporary), input_names=["images"], output_names=[output_name],
                dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}}, opset_version=17, dynamo=False,
            )
        except Exception:
            # e.g. adaptive pooling to a size that does not divide the input (simple_cnn at small sizes):
            # the torch.export-based exporter handles it.
            torch.onnx.export(
                module, (example,), str(temporary), input_names=["images"], output_names=[output_name],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=18, dynamo=True,
                verbose=False,
            )
        model = onnx.load(str(temporary))
        if any(node.op_type == "Pad" for node in model.graph.node):
            model = fold_padding_into_convolutions(model)
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(temporary))
    return path


# ---------------------------------------------------------------- TensorFlow "SAME" padding, made cheap in ONNX
#
# The EfficientNet-Lite weights come from TensorFlow, whose stride-2 convolutions pad asymmetrically ("SAME": the
# extra row and column go at the bottom and right). timm computes that padding at run time from the input's shape,
# which exports as a chain of Shape/Gather/Ceil/Pad operators; ONNX Runtime then runs a separate Pad before each of
# those convolutions and the backbone is 25% slower. At export time the input size is fixed, so the padding is a
# constant, and ONNX's Conv takes asymmetric padding itself: the two steps below make the exported graph a plain
# convolutional network again (same speed as symmetric padding, same outputs).


class _StaticPaddingConv2d(torch.nn.Module):
    """A convolution preceded by a constant zero padding [left, right, top, bottom]."""

    def __init__(self, convolution: torch.nn.Conv2d, padding: tuple[int, int, int, int]):
        super().__init__()
        self.convolution = convolution
        self.padding = padding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        conv = self.convolution
        return torch.nn.functional.conv2d(torch.nn.functional.pad(images, self.padding), conv.weight, conv.bias,
                                          conv.stride, 0, conv.dilation, conv.groups)


def with_static_same_padding(module: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """A copy of `module` whose timm `Conv2dSame` layers pad by constants computed for `input_size` (the module
    itself when it has none)."""
    import copy

    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return module
    names = [name for name, layer in module.named_modules() if isinstance(layer, Conv2dSame)]
    if not names:
        return module
    input_shapes: dict[str, tuple[int, int]] = {}
    hooks = [module.get_submodule(name).register_forward_pre_hook(
        lambda layer, inputs, name=name: input_shapes.__setitem__(name, tuple(inputs[0].shape[-2:]))) for name in names]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    module = copy.deepcopy(module)
    for name in names:
        convolution = module.get_submodule(name)
        padding: list[int] = []
        for size, kernel, stride, dilation in zip(reversed(input_shapes[name]), reversed(convolution.kernel_size),
                                                  reversed(convolution.stride), reversed(convolution.dilation)):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            padding += [total // 2, total - total // 2]  # width first, as F.pad wants: left, right, top, bottom
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child_name,
                _StaticPaddingConv2d(convolution, tuple(padding)))
    return module


def fold_padding_into_convolutions(model):
    """Fold each constant zero Pad that feeds only a Conv into that Conv's own `pads`; returns the new model.

    ONNX Runtime's basic graph optimisation (constant folding only, portable ONNX out) first turns the exported
    pad arithmetic into constants."""
    import tempfile

    import onnx
    import onnxruntime
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory(prefix="catdog-onnx-") as scratch:
        source, folded = Path(scratch) / "source.onnx", Path(scratch) / "folded.onnx"
        onnx.save(model, str(source))
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(folded))
    graph = model.graph
    constants = {initializer.name: initializer for initializer in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for pad in [node for node in graph.node if node.op_type == "Pad"]:
        mode = next((attribute.s for attribute in pad.attribute if attribute.name == "mode"), b"constant")
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or len(pad.input) < 2 or pad.input[1] not in constants or len(users) != 1 \
                or users[0].op_type != "Conv":
            continue
        if len(pad.input) > 2 and pad.input[2] and (pad.input[2] not in constants
                                                     or numpy_helper.to_array(constants[pad.input[2]]).any()):
            continue
        pads = numpy_helper.to_array(constants[pad.input[1]]).tolist()  # [N, C, H, W begins, N, C, H, W ends]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            continue
        convolution = users[0]
        attributes = {attribute.name: attribute for attribute in convolution.attribute}
        if attributes.get("auto_pad") is not None and attributes["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        before = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
        if "pads" in attributes:
            convolution.attribute.remove(attributes["pads"])
        convolution.attribute.append(onnx.helper.make_attribute(
            "pads", [before[0] + pads[2], before[1] + pads[3], before[2] + pads[6], before[3] + pads[7]]))
        convolution.input[0] = pad.input[0]
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- the command

PARITY_TOLERANCE = 1e-4


class ExportParityError(RuntimeError):
    """The exported model's probabilities differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportConfig:
    run: str = option("", "run directory made by `catdog train`")
    format: str = option("onnx", "file format", choices=("onnx", "torchscript"))
    out: str = option("", "output file; empty: <run>/model.onnx or <run>/model.torchscript.pt")
    parity_images: int = option(32, "images in the PyTorch-vs-export parity check")

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run is required")
        if self.format not in ("onnx", "torchscript"):
            raise ValueError("--format must be onnx or torchscript")
        if self.parity_images < 1:
            raise ValueError("--parity-images must be at least 1")




def parity_batch(run_dir: Path, preprocess, count: int) -> torch.Tensor:
    """Real images from the run's validation split when they are still on disk, else seeded random pixels."""
    from catdog.images import ImageLoadError, load_image
    from catdog.transforms import eval_transform

    transform = eval_transform(preprocess)
    tensors = []
    split_path = run_dir / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text())
        for relative in split.get("val", [])[: count * 2]:
            try:
                tensors.append(transform(load_image(Path(split["root"]) / relative)))
            except ImageLoadError:
                continue
            if len(tensors) == count:
                break
    if not tensors:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(count, 3, preprocess.input_size, preprocess.input_size, generator=generator) * 4 - 2
    return torch.stack(tensors)


def check_parity(reference: np.ndarray, exported: np.ndarray, what: str) -> float:
    difference = float(np.abs(reference - exported).max())
    if not difference <= PARITY_TOLERANCE:
        raise ExportParityError(f"{what}: largest probability difference {difference:.2e} exceeds {PARITY_TOLERANCE:.0e}")
    return difference


def run_export(config: ExportConfig, log=print) -> Path:
    from catdog.checkpoint import load_model

    run_dir = Path(config.run)
    model, meta = load_model(run_dir)
    suffix = ".onnx" if config.format == "onnx" else ".torchscript.pt"
    out = Path(config.out) if config.out else run_dir / f"model{suffix}"
    metadata = {"catdog_meta": json.dumps(meta.to_dict()), "class_names": json.dumps(meta.class_names),
                "preprocess": json.dumps(meta.preprocess.to_dict()), "temperature": str(meta.temperature)}
    batch = parity_batch(run_dir, meta.preprocess, config.parity_images)
    with torch.inference_mode():
        reference = torch.softmax(model(batch) / meta.temperature, dim=1).numpy()
    staging = out.with_name(f".{out.name}.staging")
    try:
        if config.format == "onnx":
            import onnxruntime

            export_onnx_module(model, staging, meta.preprocess.input_size, metadata=metadata)
            session = onnxruntime.InferenceSession(str(staging), providers=["CPUExecutionProvider"])
            stored = session.get_modelmeta().custom_metadata_map
            if json.loads(stored["class_names"]) != meta.class_names:
                raise ExportParityError("class names did not survive the export")
            (logits,) = session.run(None, {"images": batch.numpy()})
        else:
            traced = torch.jit.trace(model.eval(), batch[:2])
            torch.jit.save(traced, str(staging), _extra_files=metadata)
            with torch.inference_mode():
                logits = torch.jit.load(str(staging)).eval()(batch).numpy()
        exported = torch.softmax(torch.from_numpy(logits) / meta.temperature, dim=1).numpy()
        difference = check_parity(reference, exported, f"{config.format} export of {run_dir}")
        staging.replace(out)
    finally:
        if staging.exists():
            staging.unlink()
    log(f"exported {out} ({config.format}); parity on {len(batch)} images: max |dp| = {difference:.2e}")
    return out
