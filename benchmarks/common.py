"""Helpers shared by the benchmark scripts (not part of the catdog package)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "dogs-vs-cats"
CATDOG = [sys.executable, "-m", "catdog.cli"]


def require_shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        sys.exit(f"needs the shared Kaggle photos at {SHARED_DATA}")
    return SHARED_DATA


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def run_timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run a command, return (wall seconds, combined output); raise with the output if it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout + result.stderr
