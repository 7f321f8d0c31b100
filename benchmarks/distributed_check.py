"""Issue 11's acceptance figures for torchrun on a CPU (gloo), on the shared Kaggle photos.

    python benchmarks/distributed_check.py [--parts finetune,head,extraction,predict] [--seeds 42,1,2]

- finetune: EfficientNet-Lite0 fine-tuned for 1 epoch at 160 px on 1,000 shared photos (500 cats, 500 dogs; the
  usual 80/20 split), global batch 32, by 1 process and by `torchrun --nproc_per_node 2`: validation accuracies
  and their difference (acceptance: within 1 point), for each of `--seeds` and their mean;
- predict: `catdog predict` of test1 with the default run by 1 process and sharded over 2: whether the CSVs are
  byte-identical, and the speed-up;
- head: the default run (Lite2 features at 300 px, head on the 6,000 photos) by 1 process and by 2 processes from
  the feature cache (with --cold-head from a cold cache, so the 2 processes extract every feature themselves):
  largest difference of the two models' probabilities on the 500 test1 photos (acceptance: within 1e-4);
- extraction: the default preset on 1,000 photos from a cold cache by 1 and by 2 processes: extraction seconds,
  the speed-up, and the largest difference of the two models' test1 probabilities.
Prints one table.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_description, require_shared_data, run_timed  # noqa: E402

ENVIRONMENT = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def catdog(processes: int, arguments: list[str]) -> tuple[float, str]:
    """Run `python -m catdog ARGUMENTS` as one process or under torchrun; return (seconds, output)."""
    if processes == 1:
        return run_timed([sys.executable, "-m", "catdog", *arguments], {"PYTHONPATH": str(ROOT / "src")})
    return run_timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                      "-m", "catdog", "--", *arguments], ENVIRONMENT)


def manifest_of_first_photos(data: Path, per_class: int, destination: Path) -> Path:
    """A CSV manifest of cat.N / dog.N for the `per_class` smallest N present in the shared folder."""
    rows = []
    for name in ("cat", "dog"):
        numbered = sorted((int(path.name.split(".")[1]), path) for path in (data / "train").glob(f"{name}.*.jpg"))
        rows += [(str(path), name) for _, path in numbered[:per_class]]
    with open(destination, "w", newline="") as stream:
        csv.writer(stream).writerows([("path", "label"), *rows])
    return destination


def probabilities(csv_path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(open(csv_path)))
    columns = [key for key in rows[0] if key.startswith("prob_")]
    return [row["path"] for row in rows], np.array([[float(row[c]) for c in columns] for row in rows])


def predicted_difference(scratch: Path, first_run: str, second_run: str, data: Path) -> float:
    """Largest difference between the probabilities two runs give the test1 photos."""
    for run in (first_run, second_run):
        catdog(1, ["predict", "--run", str(scratch / run), str(data / "test1"), "--output", str(scratch / f"{run}.csv"),
                   "--no-progress"])
    first_paths, first = probabilities(scratch / f"{first_run}.csv")
    second_paths, second = probabilities(scratch / f"{second_run}.csv")
    if first_paths != second_paths:
        raise RuntimeError(f"{first_run} and {second_run} predicted different files")
    return float(np.abs(first - second).max())


def extraction_seconds(output: str) -> float:
    return float(re.search(r"features: .* in ([0-9.]+) s", output).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="finetune,predict,head,extraction")
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[42],
                        help="finetune part: comma-separated seeds, each run by 1 and by 2 processes")
    parser.add_argument("--cold-head", action="store_true", help="head part: 2 processes from a cold feature cache")
    parser.add_argument("--cache-dir", default="", help="warm feature cache of the default run; empty: catdog's default")
    arguments = parser.parse_args()
    parts = arguments.parts.split(",")
    data = require_shared_data()
    rows: list[tuple[str, str, str]] = []
    print(f"machine: {machine_description()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "finetune" in parts:
            manifest = manifest_of_first_photos(data, 500, scratch / "photos-1000.csv")
            options = ["train", "--data", str(manifest), "--model", "efficientnet_lite0", "--strategy", "finetune",
                       "--epochs", "1", "--image-size", "160", "--batch-size", "32", "--no-progress"]
            differences = []
            for seed in arguments.seeds:
                accuracies = {}
                for processes in (1, 2):
                    out = scratch / f"finetune-seed{seed}-{processes}"
                    seconds, output = catdog(processes, [*options, "--seed", str(seed), "--out", str(out)])
                    accuracies[processes] = json.loads((out / "meta.json").read_text())["metrics"]["accuracy"]
                    rows.append((f"finetune Lite0 160 px, 1,000 photos, 1 epoch, seed {seed}, {processes} process(es)",
                                 f"{seconds:.0f} s", f"val accuracy {accuracies[processes]:.4f}"))
                    print(rows[-1], flush=True)
                differences.append(100 * (accuracies[2] - accuracies[1]))
                rows.append((f"finetune, seed {seed}: 2 processes - 1 process", "", f"{differences[-1]:+.2f} points"))
                print(rows[-1], flush=True)
            if len(differences) > 1:
                # The seed sets the split, the initialisation and the batches, the same for 1 and 2 processes: the
                # paired differences isolate what distribution changes (per-process BatchNorm statistics, the
                # augmentation draws) from the seed-to-seed noise of one epoch judged on 200 images.
                rows.append((f"finetune: mean of the {len(differences)} paired differences", "",
                             f"{np.mean(differences):+.2f} points (standard error "
                             f"{np.std(differences, ddof=1) / np.sqrt(len(differences)):.2f})"))
        if {"head", "predict"} & set(parts):
            warm_cache = ["--cache-dir", arguments.cache_dir] if arguments.cache_dir else []
            seconds, _ = catdog(1, ["train", "--data", str(data / "train"), "--out", str(scratch / "head-1"),
                                    "--no-progress", *warm_cache])
            rows.append(("default head run, 6,000 photos, 1 process, warm feature cache", f"{seconds:.0f} s", ""))
            print(rows[-1], flush=True)
        if "predict" in parts:
            seconds_by_processes = {}
            for processes in (1, 2):
                seconds_by_processes[processes], _ = catdog(processes, [
                    "predict", "--run", str(scratch / "head-1"), str(data / "test1"),
                    "--output", str(scratch / f"predict-{processes}.csv"), "--no-progress"])
            same = filecmp.cmp(scratch / "predict-1.csv", scratch / "predict-2.csv", shallow=False)
            rows.append(("predict test1 (500 photos) with it, 1 process against 2",
                         f"{seconds_by_processes[1]:.0f} s against {seconds_by_processes[2]:.0f} s "
                         f"({seconds_by_processes[1] / seconds_by_processes[2]:.2f}x, with start-up)",
                         "CSV byte-identical" if same else "CSVs DIFFER"))
            print(rows[-1], flush=True)
        if "head" in parts:
            # A cold cache makes the 2 processes extract all 6,000 photos themselves (minutes); the warm one only
            # checks that rank 0 trains the same head from the cache.
            cache = ["--cache-dir", str(scratch / "cold-cache")] if arguments.cold_head else warm_cache
            seconds, output = catdog(2, ["train", "--data", str(data / "train"), "--out", str(scratch / "head-2"),
                                         "--no-progress", *cache])
            rows.append((f"default head run, 6,000 photos, 2 processes, {'cold' if arguments.cold_head else 'warm'} feature cache",
                         f"{seconds:.0f} s", f"extraction {extraction_seconds(output):.0f} s"))
            print(rows[-1], flush=True)
            rows.append(("default head run: 2 processes against 1, test1", "",
                         f"max |probability difference| {predicted_difference(scratch, 'head-1', 'head-2', data):.2e}"))
            print(rows[-1], flush=True)
        if "extraction" in parts:
            manifest = manifest_of_first_photos(data, 500, scratch / "photos-1000.csv")
            seconds_by_processes = {}
            for processes in (1, 2):
                _, output = catdog(processes, ["train", "--data", str(manifest), "--out", str(scratch / f"extract-{processes}"),
                                               "--no-progress", "--cache-dir", str(scratch / f"extract-cache-{processes}")])
                seconds_by_processes[processes] = extraction_seconds(output)
            rows.append(("default preset on 1,000 photos, cold cache (Lite2 300 px x 2 views): extraction",
                         f"1 process {seconds_by_processes[1]:.0f} s, 2 processes {seconds_by_processes[2]:.0f} s",
                         f"{seconds_by_processes[1] / seconds_by_processes[2]:.2f}x"))
            print(rows[-1], flush=True)
            rows.append(("the same: 2 processes against 1, test1", "",
                         f"max |probability difference| {predicted_difference(scratch, 'extract-1', 'extract-2', data):.2e}"))
            print(rows[-1], flush=True)
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    print()
    for row in rows:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
