"""CUDA correctness and speed check, run on a lent GPU machine (never in CI).

Fine-tunes EfficientNet-Lite0 with mixed precision and channels_last, trains the head strategy with the PyTorch
feature backend on CUDA, predicts on CUDA and compares its probabilities with the CPU's, and prints one JSON line
per check (also written to OUT/cuda_check.json).

    python benchmarks/cuda_check.py --data DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    arguments = parser.parse_args()
    from catdog.runtime.data import discover
    from catdog.training.backends import load_torch_predictor
    from catdog.training.train import TrainConfig, train

    out = Path(arguments.out)
    results: dict = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
        results["bf16"] = torch.cuda.is_bf16_supported()
    print(json.dumps(results), flush=True)

    started = time.perf_counter()
    finetune = train(TrainConfig(data=arguments.data, out=str(out / "finetune"), model="efficientnet_lite0",
                                 strategy="finetune", epochs=arguments.epochs, batch_size=64, progress=False,
                                 cache_dir=str(out / "cache")))
    results["finetune"] = {"seconds": round(time.perf_counter() - started, 1), "history": finetune.history,
                           "val_accuracy": finetune.meta.metrics["accuracy"], "log_loss": finetune.meta.metrics["log_loss"]}
    print(json.dumps({"finetune": results["finetune"]}), flush=True)

    started = time.perf_counter()
    head = train(TrainConfig(data=arguments.data, out=str(out / "head"), model="efficientnet_lite0", strategy="head",
                             progress=False, cache_dir=str(out / "cache")))
    results["head_on_cuda"] = {"seconds": round(time.perf_counter() - started, 1),
                               "val_accuracy": head.meta.metrics["accuracy"], "log_loss": head.meta.metrics["log_loss"]}
    print(json.dumps({"head_on_cuda": results["head_on_cuda"]}), flush=True)

    paths = discover(arguments.data).paths
    gpu = load_torch_predictor(str(out / "head"), "cuda")
    gpu.predict_files(paths[:256], batch_size=128)  # warm-up
    outcome = gpu.predict_files(paths, batch_size=128, decode_threads=8)
    results["predict_cuda_images_per_second"] = round(len(paths) / outcome.seconds, 1)
    cpu = load_torch_predictor(str(out / "head"), "cpu")
    sample = paths[:64]
    difference = np.abs(gpu.predict_files(sample).probabilities - cpu.predict_files(sample).probabilities).max()
    results["cuda_vs_cpu_max_probability_difference"] = float(difference)
    print(json.dumps({k: results[k] for k in ("predict_cuda_images_per_second", "cuda_vs_cpu_max_probability_difference")}), flush=True)
    (out / "cuda_check.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
