"""Export a trained run to ONNX or TorchScript, with the class names and preprocessing inside the file, and a
parity check against PyTorch after every export."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from catdog.config import option
from catdog.files import atomic_path

if TYPE_CHECKING:
    import torch

# torch is imported in the functions that export: `prediction_session_options` serves prediction through ONNX
# Runtime, which never needs it.


def export_onnx_module(module: torch.nn.Module, path: str | os.PathLike, input_size: int, output_name: str = "logits",
                       metadata: dict[str, str] | None = None) -> Path:
    """Write `module` as ONNX with a dynamic batch dimension; input "images" [N, 3, S, S] float32."""
    import onnx
    import torch

    path = Path(path)
    module = module.eval().cpu()
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
        if metadata:
            model = onnx.load(str(temporary))
            for key, value in metadata.items():
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(model, str(temporary))
    return path


def physical_cores() -> int:
    """Cores this process may use, not counting SMT siblings (convolutions gain nothing from a core's second thread)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        return max(1, min(usable, psutil.cpu_count(logical=False) or usable))
    except ImportError:
        return max(1, usable)


def prediction_session_options():
    """ONNX Runtime settings for prediction on a CPU (`catdog predict`, evaluate, serve), measured in
    benchmarks/predict_throughput.py: every graph optimisation (operator fusion, NCHWc layouts), one intra-op
    thread per physical core, operators run in sequence (a CNN is a chain: parallel execution only adds
    scheduling), memory patterns reused between same-shaped runs, no busy-waiting between operators (a spinning
    pool starves the thread that decodes the next photo). Denormals are NOT flushed to zero: ONNX Runtime's
    `session.set_denormal_as_zero` sets the flag on the calling thread for good, so every later float operation
    of the user's process (numpy, Python, hypothesis) would silently lose values below 1e-308 / 1e-38."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = physical_cores()
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


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
    import torch

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
    import torch

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
