"""The batch size a network runs fastest at on this machine: measured once, then kept in the cache.

Why measure: the fastest batch size is a property of the CPU (or GPU), not of catdog. On one 2-core machine with
AVX-512 and VNNI, ONNX Runtime ran the default run's Lite2 network at 100-120 photos/s from 1 to 8 photos a batch
and 80 at 32 (activations outgrow the caches); on an earlier machine without VNNI, 4 a batch beat 1. So each
network (its architecture and input size, not its weights) is timed once per machine at a few batch sizes on
random images, and the fastest is kept in `<cache>/batch-sizes.json` under a key naming the model, the input, the
outputs asked for, the threads and the machine (`machine_fingerprint`): a copied cache folder, another CPU, another
ONNX Runtime or another thread count measures again. Every user of a network asks here: feature extraction in
training, `catdog predict` and `catdog serve`'s micro-batches; each has an option to force a size instead.

A measurement costs a few seconds, so a short job that finds no stored choice uses `UNMEASURED_BATCH_SIZE`
instead of measuring (`measure_from`): a dozen photos would not pay for it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from catdog.runtime.files import default_cache_dir, settings_digest, write_json_atomic

CACHE_FILE = "batch-sizes.json"
CPU_CANDIDATES = (1, 2, 4, 8, 16, 32)
GPU_CANDIDATES = (8, 16, 32, 64, 128)
UNMEASURED_BATCH_SIZE = {"cpu": 4, "cuda": 64}  # before any measurement (see `measure_from`)
MEASURE_FROM = 200  # images a job must have before it spends the seconds a measurement takes
SECONDS_PER_CANDIDATE = 0.5
# CPU features that change which kernels ONNX Runtime (and PyTorch) run, so also which batch size is fastest.
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                "amx_int8", "amx_bf16", "asimd", "sve")


@dataclass
class BatchSizeChoice:
    """The batch size to run; `rates` (images/s per measured size) and `measured` say where it came from:
    "measured" (now), "cached" (an earlier measurement on this machine), "forced" (an option), "default"."""

    batch_size: int
    source: str
    rates: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.rates:
            return f"batch size {self.batch_size} ({self.source})"
        rates = ", ".join(f"{size}: {rate:.0f}" for size, rate in sorted(self.rates.items()))
        return f"batch size {self.batch_size} ({self.source} on this machine; images/s by batch size {rates})"


def machine_fingerprint(device: str = "cpu") -> dict:
    """What makes timings on this machine comparable: the processor's model name and kernel-relevant features,
    the cores this process may use, the Python platform and the ONNX Runtime version."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        import onnxruntime

        runtime_version = onnxruntime.__version__
    except ImportError:
        runtime_version = ""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"cpu": model, "flags": sorted(flags & set(KERNEL_FLAGS)), "cores": usable, "machine": platform.machine(),
            "onnxruntime": runtime_version, "device": device}


def measure_rates(run: Callable[[np.ndarray], object], image_shape: tuple[int, int, int], candidates: tuple[int, ...],
                  seconds: float = SECONDS_PER_CANDIDATE) -> dict[int, float]:
    """Images per second of `run` at each batch size, on random images of `image_shape`: one warm-up pass per size,
    then passes until `seconds` have gone by (at least two). A second round times again every size within 80% of
    the best, and each keeps its better rate, so a moment of load elsewhere on the machine does not pick the size.
    The first round stops early once two sizes in a row are below half the best so far: past the caches larger
    batches only get slower."""
    images = np.random.default_rng(0).standard_normal((max(candidates), *image_shape), dtype=np.float32)

    def rate(size: int) -> float:
        batch = np.ascontiguousarray(images[:size])
        run(batch)  # warm-up: memory patterns, lazy kernel choice
        passes, started = 0, time.perf_counter()
        while passes < 2 or time.perf_counter() - started < seconds:
            run(batch)
            passes += 1
        return size * passes / (time.perf_counter() - started)

    rates: dict[int, float] = {}
    slow_in_a_row = 0
    for size in candidates:
        rates[size] = rate(size)
        slow_in_a_row = slow_in_a_row + 1 if rates[size] < 0.5 * max(rates.values()) else 0
        if slow_in_a_row == 2:
            break
    best = max(rates.values())
    for size in [size for size, value in rates.items() if value >= 0.8 * best]:
        rates[size] = max(rates[size], rate(size))
    return rates


def _cache_entries(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again


def choose_batch_size(run: Callable[[np.ndarray], object], image_shape: tuple[int, int, int], network_key: dict,
                      images: int | None = None, forced: int = 0, device: str = "cpu",
                      cache_dir: str | os.PathLike | None = None, measure_from: int = MEASURE_FROM,
                      log: Callable[[str], None] | None = None) -> BatchSizeChoice:
    """The batch size for running `run` (a batch [N, *image_shape] -> outputs) on about `images` images (None: a
    long-running job, such as a server). `network_key` names the network's architecture, input and outputs, and
    the threads it runs with. `forced` (an option) wins; then a choice stored for this network on this machine;
    then a measurement, made and stored when the job is large enough (`measure_from`); else a default."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if forced:
        return BatchSizeChoice(forced, "forced")
    key = {"network": network_key, "machine": machine_fingerprint(kind)}
    name = settings_digest(key, 16)
    path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    stored = _cache_entries(path).get(name)
    if isinstance(stored, dict) and isinstance(stored.get("batch_size"), int):
        return BatchSizeChoice(stored["batch_size"], "cached", {int(k): v for k, v in stored.get("rates", {}).items()})
    if images is not None and images < measure_from:
        return BatchSizeChoice(UNMEASURED_BATCH_SIZE[kind], "default")
    candidates = GPU_CANDIDATES if kind == "cuda" else CPU_CANDIDATES
    if log:
        log(f"measuring the fastest batch size for {network_key.get('model', 'this network')} on this machine "
            "(once; kept in the cache)")
    rates = measure_rates(run, image_shape, candidates)
    best = max(rates, key=rates.get)
    entries = _cache_entries(path)  # re-read: another process may have stored its own meanwhile
    entries[name] = {**key, "batch_size": best, "rates": {str(size): round(rate, 2) for size, rate in rates.items()},
                     "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, entries)
    except OSError:
        pass  # a read-only cache costs a measurement next time, nothing more
    return BatchSizeChoice(best, "measured", rates)
