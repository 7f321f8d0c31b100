"""Choosing the torch device. Training layer (torch); prediction through ONNX Runtime runs on the CPU without it."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when PyTorch sees a GPU, else the CPU; otherwise the named device, refused when it is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return device
