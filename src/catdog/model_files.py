"""Which exported model file a command runs: `--model FILE`, a run's, or the built-in cat/dog model's.

The application layer, above the runtime and the training layer: a runtime-only install runs `--model FILE` and a
run's own `model.onnx` (written by `catdog export --run RUN`); with catdog[train] installed, a run without a
current model.onnx and the built-in model are exported on first use into the cache. Without it, the message says
in one line what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from catdog.extras import require_extra
from catdog.predict import Predictor, gpu_driver_present, load_model_file, load_run_model_file

BUILTIN_HOW_TO = ("no model given: pass --model FILE, an exported model (`catdog export --run RUN`); the built-in "
                  "cat/dog model is exported once with `catdog export --builtin --out catdog-builtin.onnx`, which")


def model_file_for(model: str, run: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The file to run: `model` itself; else the run's current model.onnx; else (catdog[train]) an export of the
    run, or of the built-in model when no run is given, made once and kept in the cache."""
    if model:
        return Path(model)
    if run and load_run_model_file(run) is not None:
        return Path(run) / "model.onnx"
    what = (f"run {run} has no model.onnx exported from its current weights; `catdog export --run {run}` writes it, "
            "and exporting" if run else BUILTIN_HOW_TO)
    require_extra("train", what=what)
    from catdog.export import exported_model_file  # the training layer, installed (checked above)

    return exported_model_file(run or None, cache_dir)


def wants_torch(backend: str, device: str) -> bool:
    """--backend torch; or auto on a machine with a GPU driver and catdog[train] (PyTorch with mixed precision)."""
    from catdog.extras import installed

    if backend == "torch":
        return True
    return backend == "auto" and device != "cpu" and gpu_driver_present() and installed("train") and _cuda_available()


def _cuda_available() -> bool:
    import torch  # only reached with a GPU driver present and catdog[train] installed

    return torch.cuda.is_available()


def load_predictor(model: str = "", run: str = "", backend: str = "auto", device: str = "auto",
                   cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                   ood_keep: float | None = None) -> Predictor:
    """The predictor of `--model` / `--run` / the built-in model, on ONNX Runtime or (see `wants_torch`) PyTorch."""
    if wants_torch(backend, device):
        if model:
            raise ValueError("--backend torch runs a run directory (--run) or the built-in model; an exported file runs on ONNX Runtime")
        require_extra("train", what="--backend torch")
        from catdog.backends import load_torch_predictor  # the training layer, installed (checked above)

        return load_torch_predictor(run or None, device, ood_keep)
    if run and not model:  # the run's own current model.onnx, opened once (model_file_for would open it to check)
        own = load_run_model_file(run, threads, device, ood_keep)
        if own is not None:
            return own
    return load_model_file(model_file_for(model, run, cache_dir), threads, device, ood_keep)
