"""Run directories: saving and loading models and training state in safe formats only.

A run directory holds `model.safetensors` (best weights), `meta.json` (everything predict, serve and export
need: model name, class names, preprocessing, calibration temperature), `config.json`, `history.csv`,
`split.json`, TensorBoard events and `last_checkpoint.safetensors` (for `--resume`).

Nothing here unpickles: tensors go through safetensors, everything else through JSON. Training state (optimizer,
scheduler, random generators) is a nested structure of tensors and plain values; `flatten_state` stores its
tensors under dotted keys and the rest as JSON in the safetensors header, so one file written atomically holds
the whole state and a SIGKILL can never leave the model and optimizer out of step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog.runtime.files import atomic_path, write_json_atomic
from catdog.runtime.runs import MODEL_FILE, META_FILE, RunError, RunMeta, check_not_pickle, read_meta

if TYPE_CHECKING:
    import torch

    from catdog.training.models import Classifier

# torch, safetensors and the models are imported where they are used: reading a run's metadata (predict with a
# cached ONNX file) then never pays for importing torch.

def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def save_model(run_dir: str | os.PathLike, model: Classifier, meta: RunMeta) -> None:
    """Write the weights, then meta.json; both atomically."""
    run_dir = Path(run_dir)
    save_tensors_atomic(run_dir / MODEL_FILE, model.state_dict(), {"catdog_meta": json.dumps(meta.to_dict())})
    write_json_atomic(run_dir / META_FILE, meta.to_dict())


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise RunError(f"{path}: not a readable safetensors file ({error})") from error


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Classifier, RunMeta]:
    """The best model of a run, in eval mode, with its metadata."""
    from catdog.training.models import create_model

    run_dir = Path(run_dir)
    check_not_pickle(run_dir)
    if run_dir.is_file():
        raise RunError(f"{run_dir}: expected a run directory, got a file")
    meta = read_meta(run_dir)
    tensors, _ = load_tensors(run_dir / MODEL_FILE)
    model = create_model(meta.model_name, len(meta.class_names), pretrained=False)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise RunError(f"{run_dir / MODEL_FILE}: weights do not fit {meta.model_name} ({error})") from error
    return model.to(device).eval(), meta


# ---------------------------------------------------------------- training state for --resume


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into {dotted key: tensor} and a JSON-able skeleton with placeholders."""
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__list__" if isinstance(value, list) else "__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item"):  # numpy scalars
            return value.item()
        raise TypeError(f"cannot store {type(value).__name__} at {key} in a checkpoint")

    skeleton = walk(state, prefix or "state")
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten_state(tensors, k): unflatten_state(tensors, v) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten_state(tensors, v) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(tensors, v) for v in skeleton["__tuple__"])
    return skeleton


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    tensors, skeleton = flatten_state(state)
    save_tensors_atomic(path, tensors, {"catdog_state": json.dumps(skeleton)})


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    tensors, metadata = load_tensors(path)
    if "catdog_state" not in metadata:
        raise RunError(f"{path}: not a catdog training checkpoint")
    return unflatten_state(tensors, json.loads(metadata["catdog_state"]))
