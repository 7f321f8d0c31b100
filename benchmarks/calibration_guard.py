"""The guarded temperature against the unguarded one, on a large and a small run of the shared photos.

Trains (default preset, seed 42; features from the cache when warm) and evaluates two runs with the CLI: all 6,000
photos of ../shared/data/dogs-vs-cats/train, and 98 of them (cat/dog.1001-1049, a CSV manifest). For each prints
the guarded temperature the run stored, the log-loss-optimal (unguarded) temperature on the same validation
logits, and for both: validation log loss, the largest probability, how many top probabilities print as
1.000000, and ECE before and after the temperature (from evaluate's metrics.json).

    python benchmarks/calibration_guard.py
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402

from catdog.training.calibration import log_loss_optimal_temperature, remove_temperature  # noqa: E402
from catdog.training.checkpoint import read_meta  # noqa: E402
from catdog.training.evaluate import evaluation_images, predict_through_feature_cache  # noqa: E402


def validation_logits(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation logits before its temperature (log-probabilities: softmax gives them back)."""
    meta = read_meta(run)
    images, _ = evaluation_images(run, "", "auto")
    outcome = predict_through_feature_cache(run, images.paths, meta.tta, "cpu", "auto", None)
    labels = torch.tensor([images.labels[i] for i in outcome.indices])
    return torch.log(torch.from_numpy(remove_temperature(outcome.probabilities, meta.temperature))).float(), labels


def describe(name: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> str:
    probabilities = torch.softmax(logits / temperature, dim=1)
    loss = torch.nn.functional.cross_entropy(logits / temperature, labels)
    printed_as_one = int((probabilities.max(dim=1).values >= 0.9999995).sum())
    return (f"    {name:9s} T = {temperature:.3f}: validation log loss {loss:.4f}, largest probability "
            f"{probabilities.max():.6f}, {printed_as_one} of {len(labels)} top probabilities print as 1.000000")


def main() -> None:
    train_folder = require_shared_data() / "train"
    print(f"machine: {machine_description()}")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        manifest = folder / "98.csv"
        with open(manifest, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["path", "label"])
            for name in ("cat", "dog"):
                writer.writerows([str(train_folder / f"{name}.{i}.jpg"), name] for i in range(1001, 1050))
        for title, data in (("all 6,000 photos", train_folder), ("98 photos", manifest)):
            run = folder / title.split()[0]
            seconds, _ = run_timed(CATDOG + ["train", "--data", str(data), "--out", str(run), "--no-progress"])
            run_timed(CATDOG + ["evaluate", "--run", str(run)])
            metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
            logits, labels = validation_logits(run)
            errors = int((logits.argmax(dim=1) != labels).sum())
            print(f"{title}: {len(labels)} validation images, {errors} misclassified; accuracy {metrics['accuracy']:.4f}, "
                  f"log loss {metrics['log_loss']:.4f}; ECE before temperature {metrics['ece_before_temperature']:.4f}, "
                  f"after {metrics['ece']:.4f}; trained in {seconds:.0f} s")
            print(describe("guarded", logits, labels, read_meta(run).temperature))
            print(describe("unguarded", logits, labels, log_loss_optimal_temperature(logits, labels)))


if __name__ == "__main__":
    main()
