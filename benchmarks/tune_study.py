"""Tuning on the shared photos: a head study against the default head settings, run by one or several workers.

On ../shared/data/dogs-vs-cats/train, catdog's split (seed 42), the default preset (Lite2 features at 300 px with
mirror images; the feature cache is filled first, so both sides train on the same cached features):
  (a) baseline: `catdog train --strategy head` with the default head settings: its best epoch's validation loss;
  (b) `catdog tune --strategy head`: --workers processes started at once on one study in --storage (default: a new
      SQLite file), --trials in all, split between them.
Prints the best validation loss of each and their ratio, and for the study: trials per worker, the total, how many
distinct trial numbers it holds, the states, and the wall time.

    python benchmarks/tune_study.py [--trials 20] [--workers 2 --storage postgresql://USER@HOST:PORT/DB]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials in all (split between the workers)")
    parser.add_argument("--workers", type=int, default=1, help="catdog tune processes started at once on one study")
    parser.add_argument("--storage", default="", help="Optuna storage URL; default: a new SQLite file")
    parser.add_argument("--preset", default="default", choices=("fast", "default"))
    arguments = parser.parse_args()
    import optuna

    from catdog.training.tune import sqlalchemy_url

    data = require_shared_data() / "train"
    work = Path(tempfile.mkdtemp(prefix="catdog-tune-benchmark-"))
    storage = arguments.storage or f"sqlite:///{work / 'study.db'}"
    study_name = f"benchmark-{os.getpid()}"
    print(f"machine: {machine_description()}")

    seconds, _ = run_timed(CATDOG + ["train", "--data", str(data), "--out", str(work / "baseline"), "--preset",
                                     arguments.preset, "--strategy", "head", "--no-progress"])
    with open(work / "baseline" / "history.csv") as stream:
        baseline = min(float(row["val_loss"]) for row in csv.DictReader(stream))
    print(f"(a) default head settings: best validation loss {baseline:.4f} ({seconds:.0f} s)")

    shares = [arguments.trials // arguments.workers + (index < arguments.trials % arguments.workers)
              for index in range(arguments.workers)]
    started = time.perf_counter()
    workers = [subprocess.Popen(CATDOG + ["tune", "--data", str(data), "--out", str(work / f"tune-{index}"), "--preset",
                                          arguments.preset, "--storage", storage, "--study", study_name,
                                          "--trials", str(share), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for index, share in enumerate(shares)]
    outputs = [worker.communicate()[0] for worker in workers]
    seconds = time.perf_counter() - started
    for worker, output in zip(workers, outputs):
        if worker.returncode:
            sys.exit(f"a tune worker failed ({worker.returncode}):\n{output}")
    study = optuna.load_study(study_name=study_name, storage=sqlalchemy_url(storage))
    per_worker = Counter(trial.user_attrs.get("worker", "?") for trial in study.trials)
    states = Counter(trial.state.name for trial in study.trials)
    numbers = {trial.number for trial in study.trials}
    print(f"(b) {arguments.workers} worker(s) on {storage.split('@')[-1]}: {len(study.trials)} trials "
          f"({len(numbers)} distinct numbers), per worker {sorted(per_worker.values())}, states {dict(states)}, {seconds:.0f} s")
    print(f"    best validation loss {study.best_value:.4f} with {study.best_params}")
    print(f"tuned / default validation loss: {study.best_value / baseline:.3f}")


if __name__ == "__main__":
    main()
