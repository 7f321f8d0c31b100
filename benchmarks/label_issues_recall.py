"""Recall of `catdog data issues`: do deliberately wrong labels rank at the top?

On ../shared/data/dogs-vs-cats/train: 600 photos (300 cats, 300 dogs, seeded choice) in a CSV manifest with the
labels of 12 of them swapped; `find_label_issues` ranks all 600; recall@30 is how many of the 12 are among the 30
most suspicious. Per preset (fast, default) and per seed (a different 600 and 12 each), against two baselines in
the same run: a random ranking (expected recall@30 = 12 x 30/600 = 0.6) and the same heads scored on the photos
they trained on (in-sample probabilities instead of out-of-fold ones: a head that saw a wrong label believes it).
Then ranks all 6,000 shared photos with the default preset and lists what it flags.

Reads features from the feature cache (~/.cache/catdog or $CATDOG_CACHE) and computes the missing ones.

    python benchmarks/label_issues_recall.py [--seeds 3] [--skip-all]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, require_shared_data  # noqa: E402

from catdog.runtime.data import discover  # noqa: E402
from catdog.training.label_issues import find_label_issues, photo_features, rank_label_issues  # noqa: E402

PER_CLASS, FLIPPED, TOP = 300, 12, 30


def flipped_label_manifest(train_folder: Path, folder: Path, seed: int) -> tuple[Path, set[str]]:
    generator = np.random.default_rng(seed)
    photos = sorted(train_folder.glob("*.jpg"))
    chosen = []
    for name in ("cat", "dog"):
        of_class = [p for p in photos if p.name.startswith(name + ".")]
        chosen += [(p, name) for p in generator.choice(of_class, PER_CLASS, replace=False)]
    wrong = set(generator.choice(len(chosen), FLIPPED, replace=False).tolist())
    manifest = folder / f"manifest-{seed}.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        for index, (path, label) in enumerate(chosen):
            writer.writerow([str(path), {"cat": "dog", "dog": "cat"}[label] if index in wrong else label])
    return manifest, {chosen[i][0].name for i in wrong}


def in_sample_recall(manifest: Path, preset: str, flipped: set[str]) -> int:
    """The baseline: one head trained on all 600 photos scores those same photos."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images = discover(manifest)
    features, _ = photo_features(images, preset)
    labels = np.asarray(images.labels)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(features, labels)
    order, _ = rank_label_issues(labels, head.predict_proba(features))
    return len({images.paths[i].name for i in order[:TOP]} & flipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="how many different 600-photo samples per preset")
    parser.add_argument("--skip-all", action="store_true", help="skip ranking all 6,000 photos")
    arguments = parser.parse_args()
    train_folder = require_shared_data() / "train"
    print(f"machine: {machine_description()}")
    print(f"{PER_CLASS * 2} photos, {FLIPPED} labels swapped; recall@{TOP} (random ranking: {FLIPPED * TOP / (2 * PER_CLASS):.1f})")
    with tempfile.TemporaryDirectory() as folder:
        for preset in ("fast", "default"):
            recalls, baselines = [], []
            for seed in range(arguments.seeds):
                manifest, flipped = flipped_label_manifest(train_folder, Path(folder), seed)
                result = find_label_issues(manifest, preset)
                top = {Path(row.path).name for row in result.rows[:TOP]}
                recalls.append(len(top & flipped))
                baselines.append(in_sample_recall(manifest, preset, flipped))
                ranks = sorted(i + 1 for i, row in enumerate(result.rows) if Path(row.path).name in flipped)
                print(f"  {preset:7s} seed {seed}: recall@{TOP} {recalls[-1]}/{FLIPPED}, in-sample heads {baselines[-1]}/{FLIPPED}; "
                      f"{len(result.flagged)} flagged; ranks of the swapped labels {ranks}; {result.seconds:.1f} s")
            print(f"{preset}: recall@{TOP} {np.mean(recalls):.2f}/{FLIPPED} (min {min(recalls)}), "
                  f"in-sample baseline {np.mean(baselines):.2f}/{FLIPPED}, random {FLIPPED * TOP / (2 * PER_CLASS):.1f}/{FLIPPED}; "
                  f"{np.mean(recalls) / (FLIPPED * TOP / (2 * PER_CLASS)):.0f}x random")
    if arguments.skip_all:
        return
    started = time.perf_counter()
    result = find_label_issues(train_folder, "default")
    print(f"all {len(result.rows)} shared photos, default preset: {len(result.flagged)} flagged in "
          f"{time.perf_counter() - started:.1f} s (features from the cache)")
    for rank, row in enumerate(result.rows[:40], start=1):
        print(f"  {rank:3d} {row.path:14s} labelled {row.given_label}, looks {row.suggested_label} "
              f"p({row.given_label}) = {row.given_label_probability:.4f}{'  [flagged]' if row.label_issue else ''}")
    names = [Path(row.path).name for row in result.rows]
    if "dog.2099.jpg" in names:
        row = result.rows[names.index("dog.2099.jpg")]
        print(f"dog.2099.jpg (shows cats): rank {names.index('dog.2099.jpg') + 1}, p(dog) = {row.given_label_probability:.4f}")


if __name__ == "__main__":
    main()
