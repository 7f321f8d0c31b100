"""Exported model files (`catdog export`), the deployable unit, as the runtime opens them; and `open_run`, the one
place a run directory becomes the model file that predicts for it.

What an exported file carries in its ONNX metadata: the format name and version, the run's metadata as JSON, where
the heatmaps' cells look (`export.heatmap_offset`), and `weights_sha1`, the digest of what it was exported from
(`runs.weights_digest`), so a run's own model.onnx is used only while it matches the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from catdog.runtime.extras import require_extra
from catdog.runtime.predict import Predictor
from catdog.runtime.runs import MODEL_FILE, RunError, RunMeta, check_not_pickle, weights_digest

MODEL_FORMAT = "catdog-model/1"
EXPORTED_MODEL_FILE = "model.onnx"  # a run's own export, beside its weights (`catdog export --run RUN`)

# How a run without a current model.onnx gets one: the training layer's `export.export_run_to_cache(run, digest,
# cache_dir)`, passed in by the caller that has catdog[train] (the runtime never imports the training layer).
RunExporter = Callable[[str, str, "str | os.PathLike | None"], Path]


def model_file_metadata(metadata: dict[str, str], path: str | os.PathLike) -> tuple[RunMeta, tuple[float, float]]:
    """The run metadata and heatmap offset stored in an exported file; RunError naming the file when it is not one."""
    if metadata.get("catdog_format") != MODEL_FORMAT:
        found = metadata.get("catdog_format") or ("an older catdog export" if "catdog_meta" in metadata else "no catdog metadata")
        raise RunError(f"{path}: not a catdog {MODEL_FORMAT} model file ({found}); export it again with "
                       "`catdog export --run RUN --out model.onnx` (needs catdog[train])")
    try:
        meta = RunMeta.from_dict(json.loads(metadata["catdog_meta"]))
        offset = tuple(float(v) for v in json.loads(metadata.get("heatmap_offset", "[0, 0]")))
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{path}: unreadable catdog metadata ({error})") from error
    return meta, (offset[0], offset[1])


def load_model_file(path: str | os.PathLike, threads: int | None = None, device: str = "cpu",
                    ood_keep: float | None = None) -> Predictor:
    """A predictor of an exported ONNX file (`catdog export`), on ONNX Runtime; `ood_keep` moves its
    out-of-distribution threshold to keep that share of the run's validation photos."""
    from catdog.runtime.inference import OnnxNetwork

    check_not_pickle(path)
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path}: expected an exported model file (model.onnx); for a run directory use --run")
    if not path.is_file():
        raise RunError(f"{path}: model file not found")
    try:
        network = OnnxNetwork(path, threads, device)
    except Exception as error:  # onnxruntime raises its own error types for files it cannot read
        raise RunError(f"{path}: not a readable ONNX model ({str(error).splitlines()[0][:200]})") from error
    meta, offset = model_file_metadata(network.metadata, path)
    return Predictor(network, meta, offset, str(path), network.device, ood_keep)


def open_run(run: str | os.PathLike, export: RunExporter | None = None, cache_dir: str | os.PathLike | None = None,
             threads: int | None = None, device: str = "cpu", ood_keep: float | None = None) -> Predictor:
    """The predictor of run directory `run`: its own model.onnx when that was exported from the run as it is now
    (or the run has no weights beside it, as a deployed copy), else `export(run, digest, cache_dir)`'s file. The
    run's files are each read once: the digest of its weights, bank and meta.json is computed here and handed to
    the export; the chosen file is opened once. Without `export` (a runtime-only install) a stale or missing
    model.onnx is an error that says how to export it."""
    check_not_pickle(run)
    run = Path(run)
    if not (run / MODEL_FILE).is_file():
        if (run / EXPORTED_MODEL_FILE).is_file():
            return load_model_file(run / EXPORTED_MODEL_FILE, threads, device, ood_keep)
        raise RunError(f"{run}: not a catdog run directory (no {MODEL_FILE} or {EXPORTED_MODEL_FILE})")
    digest = weights_digest(run)
    if (run / EXPORTED_MODEL_FILE).is_file():
        own = load_model_file(run / EXPORTED_MODEL_FILE, threads, device, ood_keep)
        if own.network.metadata.get("weights_sha1") == digest:
            return own
    if export is None:
        how = f"run {run} has no {EXPORTED_MODEL_FILE} exported from its current weights; `catdog export --run {run}` writes it"
        require_extra("train", what=f"{how}, and exporting")  # a runtime-only install: say which extra
        raise RunError(how)
    return load_model_file(export(str(run), digest, cache_dir), threads, device, ood_keep)
