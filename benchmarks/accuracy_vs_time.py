"""Accuracy against wall-clock time: catdog's default and fast presets vs the PyTorch tutorial's recipe.

On ../shared/data/dogs-vs-cats/train with catdog's fixed stratified 80/20 split (seed 42), in one invocation:
  (a) `catdog train` with the default preset, cold feature cache: raw JPEGs to saved model;
  (a2) the same again with the warm cache;
  (c) `catdog train --preset fast`, cold cache;
  (b) the tutorial's recipe (three conv layers 16/32/64 + max-pool, dense 512 + dropout 0.5, from scratch; Adam
      lr 1e-3, weight decay 1e-4; StepLR(7, 0.1); batch 32; 224 px; random resized crop, flip, rotation 10 degrees,
      colour jitter 0.2/0.2/0.2/0.1), given the wall time (a) took, training and validation included.
Prints wall seconds, validation accuracy and log loss for each, and the ratios.

    python benchmarks/accuracy_vs_time.py [--skip-tutorial]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402

from catdog.runtime.data import discover, stratified_split  # noqa: E402

from catdog.training.datasets import ImageFileDataset, collate_skipping_bad_images
from catdog.training.metrics import classification_metrics  # noqa: E402

SEED = 42


class TutorialNet(nn.Module):
    """The tutorial's network as described: fixed 224 px input, conv 16/32/64 with max-pooling, dense 512."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 28 * 28, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def tutorial_recipe(data_dir: Path, budget_seconds: float) -> dict:
    """Train the tutorial's recipe until the budget (minus the time validation will take) is spent."""
    started = time.perf_counter()
    torch.manual_seed(SEED)
    images = discover(data_dir)
    train_indices, val_indices = stratified_split(images.labels, 0.2, SEED)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_transform = v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.RandomRotation(10),
        v2.ColorJitter(0.2, 0.2, 0.2, 0.1), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    eval_transform = v2.Compose([
        v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    train_set = ImageFileDataset([images.paths[i] for i in train_indices], [images.labels[i] for i in train_indices], train_transform)
    val_set = ImageFileDataset([images.paths[i] for i in val_indices], [images.labels[i] for i in val_indices], eval_transform)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2, collate_fn=collate_skipping_bad_images)
    val_loader = DataLoader(val_set, batch_size=64, num_workers=2, collate_fn=collate_skipping_bad_images)
    model = TutorialNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    loss_function = nn.CrossEntropyLoss()
    validation_estimate = len(val_set) / 60.0  # measured ~60+ img/s for this network's inference here
    trained_images, epochs, out_of_time = 0, 0, False
    while not out_of_time:
        model.train()
        for batch in loader:
            if time.perf_counter() - started + validation_estimate >= budget_seconds:
                out_of_time = True
                break
            optimizer.zero_grad()
            loss = loss_function(model(batch.images), batch.labels)
            loss.backward()
            optimizer.step()
            trained_images += len(batch.labels)
        else:
            epochs += 1
            scheduler.step()
    model.eval()
    probabilities, labels = [], []
    with torch.inference_mode():
        for batch in val_loader:
            probabilities.append(torch.softmax(model(batch.images), 1))
            labels.append(batch.labels)
    metrics = classification_metrics(torch.cat(labels).numpy(), torch.cat(probabilities).numpy(), images.class_names)
    return {"seconds": time.perf_counter() - started, "accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"],
            "trained_images": trained_images, "epochs": epochs + trained_images / len(train_set) % 1}


def catdog_train(data_dir: Path, out: Path, cache: Path, preset: str) -> dict:
    seconds, output = run_timed(CATDOG + ["train", "--data", str(data_dir), "--out", str(out), "--preset", preset,
                                          "--seed", str(SEED), "--no-progress"], env={"CATDOG_CACHE": str(cache)})
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": seconds, "accuracy": meta["metrics"]["accuracy"], "log_loss": meta["metrics"]["log_loss"],
            "model": meta["model_name"], "log": output.strip().splitlines()[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--skip-fast", action="store_true")
    arguments = parser.parse_args()
    data_dir = require_shared_data() / "train"
    results = {}
    with tempfile.TemporaryDirectory(prefix="catdog-bench-") as scratch:
        scratch = Path(scratch)
        results["catdog default (cold cache)"] = catdog_train(data_dir, scratch / "a", scratch / "cache-default", "default")
        print("a:", results["catdog default (cold cache)"], flush=True)
        results["catdog default (warm cache)"] = catdog_train(data_dir, scratch / "a2", scratch / "cache-default", "default")
        print("a2:", results["catdog default (warm cache)"], flush=True)
        if not arguments.skip_fast:
            results["catdog fast (cold cache)"] = catdog_train(data_dir, scratch / "c", scratch / "cache-fast", "fast")
            print("c:", results["catdog fast (cold cache)"], flush=True)
        if not arguments.skip_tutorial:
            budget = results["catdog default (cold cache)"]["seconds"]
            results["tutorial recipe (same wall time)"] = tutorial_recipe(data_dir, budget)
            print("b:", results["tutorial recipe (same wall time)"], flush=True)
    print(f"\nmachine: {machine_description()}")
    print(f"{'run':36s} {'wall s':>8s} {'val acc':>8s} {'log loss':>9s}")
    for name, result in results.items():
        print(f"{name:36s} {result['seconds']:8.1f} {result['accuracy']:8.4f} {result['log_loss']:9.4f}")
    default = results["catdog default (cold cache)"]
    if "tutorial recipe (same wall time)" in results:
        tutorial = results["tutorial recipe (same wall time)"]
        print(f"\ntutorial recipe trained on {tutorial['trained_images']} images ({tutorial['epochs']:.2f} epochs) in its budget")
        print(f"error-rate ratio tutorial / catdog default: {(1 - tutorial['accuracy']) / max(1e-9, 1 - default['accuracy']):.1f}x")
        print(f"log-loss ratio tutorial / catdog default: {tutorial['log_loss'] / default['log_loss']:.1f}x")
    warm = results["catdog default (warm cache)"]
    print(f"warm-cache speed-up: {default['seconds'] / warm['seconds']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
