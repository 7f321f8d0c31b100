"""ONNX Runtime: the one place catdog opens an inference session. Runtime layer (no torch).

Prediction, serving, heatmaps, evaluation and frozen-feature extraction all run exported networks through here, so
they share one set of session settings, measured in benchmarks/predict_throughput.py: every graph optimisation
(operator fusion, NCHWc layouts), one intra-op thread per physical core unless told otherwise, operators in
sequence (a CNN is a chain: parallel execution only adds scheduling), memory patterns reused between same-shaped
runs, and no busy-waiting between operators (a spinning pool starves the thread that decodes the next photo;
+8% images/s end to end on 2 cores).

Denormals are NOT flushed to zero: ONNX Runtime's `session.set_denormal_as_zero` sets the flag on the calling
thread for good, so every later float operation of the user's process (numpy, Python, hypothesis) would silently
lose values below 1e-308 / 1e-38.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def physical_cores() -> int:
    """Cores this process may use, not counting SMT siblings (convolutions gain nothing from a core's second thread)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil  # optional: without it every usable logical core counts

        return max(1, min(usable, psutil.cpu_count(logical=False) or usable))
    except ImportError:
        return max(1, usable)


def session_options(threads: int | None = None):
    """The session settings described above; `threads` intra-op threads (None: one per physical core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def execution_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime's providers for `device`: "cpu"; "cuda" (refused when this ONNX Runtime has no CUDA, e.g. the
    plain `onnxruntime` wheel rather than `onnxruntime-gpu`); "auto": CUDA when available, else the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ValueError(f"--device {device}: this ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxNetwork:
    """An exported network in an ONNX Runtime session: `run(images, outputs)` gives the named outputs as arrays.
    Input "images" [N, 3, S, S] float32; outputs as the file names them ("logits", "features", "class_maps")."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "cpu"):
        import onnxruntime

        self.path = Path(path)
        self.threads = threads or physical_cores()
        self.session = onnxruntime.InferenceSession(str(path), session_options(self.threads), providers=execution_providers(device))
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.outputs = tuple(output.name for output in self.session.get_outputs())
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        values = self.session.run(list(outputs), {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(outputs, values))
