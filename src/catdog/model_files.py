"""Which model a command runs: `--model FILE`, a run's (`--run RUN`), or the built-in cat/dog model's. The one
place the command line and the Python API turn those options into a predictor.

The top layer, above the runtime and the training layer: a runtime-only install runs `--model FILE` and a run's
own current `model.onnx` (written by `catdog export --run RUN`); with catdog[train] installed, a run without a
current model.onnx and the built-in model are exported on first use into the cache (`runtime.model_file.open_run`
decides which file a run predicts with). Without it, the message says in one line what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from catdog.runtime.extras import installed, require_extra
from catdog.runtime.model_file import load_model_file, open_run
from catdog.runtime.predict import Predictor, gpu_driver_present

BUILTIN_HOW_TO = ("no model given: pass --model FILE, an exported model (`catdog export --run RUN`); the built-in "
                  "cat/dog model is exported once with `catdog export --builtin --out catdog-builtin.onnx`, which")


def wants_torch(backend: str, device: str) -> bool:
    """--backend torch; or auto on a machine with a GPU driver and catdog[train] (PyTorch with mixed precision)."""
    if backend == "torch":
        return True
    return backend == "auto" and device != "cpu" and gpu_driver_present() and installed("train") and _cuda_available()


def _cuda_available() -> bool:
    import torch  # only reached with a GPU driver present and catdog[train] installed

    return torch.cuda.is_available()


def export_with_the_training_layer(run: str, digest: str, cache_dir: str | os.PathLike | None) -> Path:
    """`export.export_run_to_cache`, imported (with torch) only when a run's model.onnx must really be made."""
    from catdog.training.export import export_run_to_cache  # the training layer, installed (checked by the caller)

    return export_run_to_cache(run, digest, cache_dir)


def open_model(model: str = "", run: str = "", backend: str = "auto", device: str = "auto",
               cache_dir: str | os.PathLike | None = None, threads: int | None = None,
               ood_keep: float | None = None) -> Predictor:
    """The predictor of `--model` / `--run` / the built-in model, on ONNX Runtime or (see `wants_torch`) PyTorch."""
    if wants_torch(backend, device):
        if model:
            raise ValueError("--backend torch runs a run directory (--run) or the built-in model; an exported file runs on ONNX Runtime")
        require_extra("train", what="--backend torch")
        from catdog.training.backends import load_torch_predictor  # the training layer, installed (checked above)

        return load_torch_predictor(run or None, device, ood_keep)
    if model:
        return load_model_file(model, threads, device, ood_keep)
    if run:
        export = export_with_the_training_layer if installed("train") else None
        return open_run(run, export, cache_dir, threads, device, ood_keep)
    require_extra("train", what=BUILTIN_HOW_TO)
    from catdog.training.export import builtin_model_file  # the training layer, installed (checked above)

    return load_model_file(builtin_model_file(cache_dir), threads, device, ood_keep)
