"""Folder prediction throughput: `catdog predict` (each backend) vs the tutorial's one-image-at-a-time loop.

End to end, from JPEG files on disk to the CSV, process start included for catdog (a fresh `catdog predict`
process per measurement, after one untimed warm-up run that fills the ONNX cache as a first use would).
Inputs: ../shared/data/dogs-vs-cats/test1 (500 photos, 200x200), the 6,000 train photos as an unlabelled folder of a
few thousand, the 500 test photos upscaled to Kaggle's typical original size (500x375), and 200 of them upscaled to
2000x1500 (large photos).
The model is the built-in zero-training cat/dog model (EfficientNet-Lite0, 224 px) for every contender.

    python benchmarks/predict_throughput.py [--skip-large] [--skip-train]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402


def tutorial_predict_image_loop(folder: Path, output: Path, limit: int | None = None) -> tuple[float, int]:
    """The tutorial's predict_image: open, transform, one forward pass per image, eager PyTorch; then the CSV."""
    from torchvision import transforms

    from catdog.models import create_zero_training_model

    started = time.perf_counter()
    model, preprocess = create_zero_training_model()
    model.eval()
    transform = transforms.Compose([transforms.Resize(preprocess.resize_size), transforms.CenterCrop(preprocess.input_size),
                                    transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)])
    paths = sorted(folder.glob("*.jpg"))[:limit]
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            probabilities = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
        rows.append((str(path), ["cat", "dog"][int(probabilities.argmax())], float(probabilities.max())))
    with open(output, "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    return time.perf_counter() - started, len(paths)


def make_resized_photos(source: Path, target: Path, count: int, size: tuple[int, int]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.jpg"))[:count]:
        Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target / path.name, quality=90)
    return target


def catdog_predict(folder: Path, output: Path, backend: str, cache: Path) -> tuple[float, int]:
    command = CATDOG + ["predict", str(folder), "--output", str(output), "--backend", backend, "--no-progress"]
    seconds, _ = run_timed(command, env={"CATDOG_CACHE": str(cache)})
    with open(output) as stream:
        return seconds, sum(1 for _ in stream) - 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--tutorial-limit", type=int, default=500, help="images the (slow) tutorial loop gets per folder")
    arguments = parser.parse_args()
    data = require_shared_data()
    results: list[tuple[str, str, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="catdog-predict-bench-") as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        folders = {"test1 (500, ~200 px)": data / "test1"}
        if not arguments.skip_train:
            folders["train as unlabelled (6000, ~200 px)"] = data / "train"
        if not arguments.skip_large:
            folders["Kaggle original size (500, 500x375)"] = make_resized_photos(data / "test1", scratch / "original", 500, (500, 375))
            folders["large (200, 2000x1500)"] = make_resized_photos(data / "test1", scratch / "large", 200, (2000, 1500))
        catdog_predict(data / "test1", scratch / "warmup.csv", "onnxruntime", cache)  # first use: exports the ONNX file
        for name, folder in folders.items():
            for backend in ("onnxruntime", "torch"):
                seconds, count = catdog_predict(folder, scratch / f"{backend}.csv", backend, cache)
                results.append((name, f"catdog predict --backend {backend}", seconds, count))
                print(results[-1], flush=True)
            seconds, count = tutorial_predict_image_loop(folder, scratch / "tutorial.csv", arguments.tutorial_limit)
            results.append((name, "tutorial predict_image loop", seconds, count))
            print(results[-1], flush=True)
    print(f"\nmachine: {machine_description()}")
    print(f"{'input':38s} {'contender':34s} {'images':>7s} {'wall s':>8s} {'images/s':>9s} {'vs tutorial':>11s}")
    for name in dict.fromkeys(r[0] for r in results):
        rows = [r for r in results if r[0] == name]
        tutorial_rate = next(count / seconds for n, c, seconds, count in rows if c.startswith("tutorial"))
        for _, contender, seconds, count in rows:
            rate = count / seconds
            print(f"{name:38s} {contender:34s} {count:7d} {seconds:8.1f} {rate:9.1f} {rate / tutorial_rate:10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
