"""Export a trained run to ONNX or TorchScript, with the class names and preprocessing inside the file, and a
parity check against PyTorch after every export."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catdog.files import atomic_path


def export_onnx_module(module: torch.nn.Module, path: str | os.PathLike, input_size: int, output_name: str = "logits",
                       metadata: dict[str, str] | None = None) -> Path:
    """Write `module` as ONNX with a dynamic batch dimension; input "images" [N, 3, S, S] float32."""
    import onnx

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
