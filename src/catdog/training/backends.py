"""Prediction in the training layer: the PyTorch twin of an exported file (CUDA, mixed precision, channels_last),
and prediction shared by the processes of a torchrun launch. Training layer (torch).

`TorchNetwork` runs the very module `catdog export` writes (`export.DeployableNetwork`), so the runtime's
`Predictor` applies the same temperature, mirror view and heatmaps to its outputs whichever backend computed them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from catdog.training.devices import resolve_device
from catdog.training.distributed import all_gather_objects, init_from_environment, is_main_process, shard_indices, world_size
from catdog.training.export import DeployableNetwork, builtin_model_file, heatmap_offset, load_exportable, open_run_with_export
from catdog.runtime.images import ImageLoadError
from catdog.runtime.predict import (
    PredictConfig,
    PredictionOutcome,
    Predictor,
    collect_or_fail,
    message_log,
    outcome_decisions,
    write_prediction_outputs,
)
from catdog.runtime.model_file import load_model_file
from catdog.runtime.progress import progress_bar


class TorchNetwork:
    """`DeployableNetwork` on a torch device, answering like `inference.OnnxNetwork`."""

    backend = "torch"

    def __init__(self, network: DeployableNetwork, device: torch.device):
        self.device = torch.device(device)
        self.network = network.eval().to(self.device, memory_format=torch.channels_last)
        self.outputs = network.output_names

    @torch.inference_mode()
    def run(self, images: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        images = torch.as_tensor(np.ascontiguousarray(images)).to(self.device, non_blocking=True,
                                                                  memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            values = dict(zip(self.network.output_names, self.network(images)))
        # Indices (nearest_neither) stay integers; everything else comes back in float32, as ONNX Runtime gives it.
        return {name: (values[name].float() if values[name].is_floating_point() else values[name]).cpu().numpy()
                for name in outputs}


def load_torch_predictor(run: str | None, device: str | torch.device = "auto", ood_keep: float | None = None) -> Predictor:
    """A run's model (the built-in one when `run` is empty) in PyTorch on `device`."""
    network, meta = load_exportable(run)
    offset = heatmap_offset(network, meta.preprocess.input_size)
    torch_device = resolve_device(device) if isinstance(device, str) else device
    return Predictor(TorchNetwork(network, torch_device), meta, offset, run or "built-in", torch_device.type, ood_keep)


def load_run_predictor(run: str | None, backend: str = "auto", device: str = "auto",
                       cache_dir: str | os.PathLike | None = None) -> Predictor:
    """A run's predictor for the training layer's commands: ONNX Runtime on its exported file (exported on first
    use) unless `backend` is torch, or auto on a CUDA machine."""
    torch_device = resolve_device(device)
    if backend == "torch" or (backend == "auto" and torch_device.type == "cuda"):
        return load_torch_predictor(run, torch_device)
    return open_run_with_export(run, cache_dir) if run else load_model_file(builtin_model_file(cache_dir))


def predict_files_across_ranks(predictor: Predictor, paths: Sequence[Path], batch_size: int = 0, tta: bool | None = None,
                               progress: Callable[[int], None] | None = None,
                               check_orientation: bool = False) -> PredictionOutcome:
    """`Predictor.predict_files` shared by the ranks of a torchrun launch: each rank predicts a disjoint share of
    `paths` and every rank gets the whole outcome, in the order of `paths`, as one process would have it."""
    positions = shard_indices(len(paths))
    mine = predictor.predict_files([paths[i] for i in positions], batch_size, tta, progress,
                                   check_orientation=check_orientation)
    if world_size() == 1:
        return mine
    indices: list[int] = []
    errors: list[ImageLoadError] = []
    shares = all_gather_objects((positions, mine))
    for share_positions, outcome in shares:
        indices.extend(share_positions[i] for i in outcome.indices)
        errors.extend(outcome.errors)
    order = np.argsort(indices, kind="stable")
    position_of = {str(path): i for i, path in enumerate(paths)}
    errors.sort(key=lambda error: position_of.get(error.path, len(paths)))

    def joined(name: str) -> np.ndarray | None:  # each rank's share, in the order of `paths`
        if getattr(mine, name) is None:
            return None
        return np.concatenate([getattr(outcome, name) for _, outcome in shares])[order]

    return PredictionOutcome([indices[i] for i in order], joined("probabilities"), errors,
                             max(outcome.seconds for _, outcome in shares), joined("ood_scores"),
                             joined("neither_distances"), joined("nearest_neither"), joined("neither_scores"))


def join_ranks(device: str) -> str:
    """Join torchrun's process group; this rank's device ("cpu", or "cuda:N" for its local rank)."""
    return str(init_from_environment(resolve_device(device)))


def run_predict_across_ranks(config: PredictConfig, predictor: Predictor, log: Callable[[str], None] | None = None) -> int:
    """`catdog predict` under torchrun (after `join_ranks`): the ranks predict disjoint shares of the files with
    `predictor` (each rank's own, on its device), and rank 0 writes what one process would have written."""
    log = log or message_log(config)
    paths, left_out = collect_or_fail(config.paths)
    main = is_main_process()
    if main:
        log(f"predicting {len(paths)} images with {predictor.describe()} in {world_size()} processes")
    with progress_bar(config.progress and main, len(shard_indices(len(paths))), "predict", leave=True) as bar:
        outcome = predict_files_across_ranks(predictor, paths, config.batch_size, config.tta, bar.update,
                                             config.check_orientation)
    if not main:
        return 0  # rank 0 writes the CSVs and reports
    return write_prediction_outputs(config, paths, left_out, predictor.class_names, outcome, log,
                                    *outcome_decisions(predictor, outcome))
