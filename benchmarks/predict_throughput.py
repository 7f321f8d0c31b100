"""Folder prediction throughput: `catdog predict` (each backend) vs the tutorial's one-image-at-a-time loop.

End to end, from JPEG files on disk to the CSV, process start included for catdog (a fresh `catdog predict`
process per measurement, after one untimed warm-up run that fills the ONNX cache as a first use would).
Inputs: ../shared/data/dogs-vs-cats/test1 (500 photos, 200x200), the 6,000 train photos as an unlabelled folder of a
few thousand, the 500 test photos upscaled to Kaggle's typical original size (500x375), and 200 of them upscaled to
2000x1500 (large photos).
catdog runs its built-in zero-training cat/dog model (EfficientNet-Lite0, 224 px). The tutorial's loop runs three
models: its ResNet-18 (the reference: the issue's "about 15 images/s"), catdog's Lite0 (same model, so the ratio
isolates the loop), and its small CNN.

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


def tutorial_model(name: str):
    """The network the tutorial's loop runs, and its preprocessing.

    resnet18: the tutorial's transfer-learning model (torchvision ResNet-18 with a 2-class head). Its ImageNet
        weights are not available offline here, so it runs with random weights: the arithmetic, and so the speed,
        is the same. This is the reference the issue's "about 15 images/s" figure describes.
    efficientnet_lite0: catdog's own zero-training model in the tutorial's loop (same model, different loop).
    simple_cnn: the tutorial's from-scratch network (fast, but at chance accuracy after the tutorial's training).
    """
    import torchvision

    from catdog.models import create_model, create_zero_training_model
    from catdog.transforms import Preprocess

    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None)
        model.fc = torch.nn.Linear(512, 2)
        return model, Preprocess(224, 0.875)
    if name == "simple_cnn":
        return create_model("simple_cnn", 2), Preprocess(224, 0.875)
    return create_zero_training_model()


def tutorial_predict_image_loop(folder: Path, output: Path, model_name: str, limit: int | None = None) -> tuple[float, int]:
    """The tutorial's predict_image: open, transform, one forward pass per image, eager PyTorch; then the CSV."""
    from torchvision import transforms

    started = time.perf_counter()
    model, preprocess = tutorial_model(model_name)
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


TUTORIAL_MODELS = {
    "resnet18": "tutorial loop, ResNet-18 (its model)",
    "efficientnet_lite0": "tutorial loop, Lite0 (catdog's model)",
    "simple_cnn": "tutorial loop, small CNN (chance acc.)",
}
REFERENCE = TUTORIAL_MODELS["resnet18"]
SAME_MODEL = TUTORIAL_MODELS["efficientnet_lite0"]


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
    parser.add_argument("--tutorial-limit", type=int, default=300, help="images the (slow) tutorial loop gets per folder")
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
            for model_name, contender in TUTORIAL_MODELS.items():
                seconds, count = tutorial_predict_image_loop(folder, scratch / "tutorial.csv", model_name, arguments.tutorial_limit)
                results.append((name, contender, seconds, count))
                print(results[-1], flush=True)
    print(f"\nmachine: {machine_description()}")
    print("ratios: 'vs tutorial' against the tutorial's loop with its ResNet-18; 'vs same model' against the tutorial's "
          "loop running catdog's Lite0")
    print(f"{'input':38s} {'contender':40s} {'images':>7s} {'wall s':>8s} {'images/s':>9s} {'vs tutorial':>11s} {'vs same model':>13s}")
    for name in dict.fromkeys(r[0] for r in results):
        rows = [r for r in results if r[0] == name]
        reference_rate = next(count / seconds for _, contender, seconds, count in rows if contender == REFERENCE)
        same_model_rate = next(count / seconds for _, contender, seconds, count in rows if contender == SAME_MODEL)
        for _, contender, seconds, count in rows:
            rate = count / seconds
            print(f"{name:38s} {contender:40s} {count:7d} {seconds:8.1f} {rate:9.1f} {rate / reference_rate:10.2f}x "
                  f"{rate / same_model_rate:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
