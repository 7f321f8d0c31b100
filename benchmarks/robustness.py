"""Right on damaged photos (#17): clean and damaged accuracy and log loss, before and after, with cold training times.

before: today's recipe (the preset with --damage-views 0); after: the preset as it is now (its damaged training
views). Both are trained cold (an empty feature cache each, so every feature is computed) in this one invocation,
one after the other, then evaluated with `catdog evaluate --corruptions` (each kind of damage of
catdog/training/corruptions.py at its two severities, on the validation split; the damaged photos' features are computed
once, in a shared cache, and serve both runs). Prints one table and writes robustness.json into --work.

    .venv/bin/python benchmarks/robustness.py [--preset default|fast] [--work /tmp/robustness]

Timing on a shared machine: other jobs slow whichever run they overlap; `--order after-first` runs the other way
round, to see how much the order matters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402


def train_cold(name: str, work: Path, data: Path, preset: str, extra: list[str]) -> float:
    run, cache = work / name, work / f"cache-{name}"
    for folder in (run, cache):
        shutil.rmtree(folder, ignore_errors=True)
    seconds, output = run_timed(CATDOG + ["train", "--data", str(data), "--out", str(run), "--preset", preset,
                                          "--cache-dir", str(cache), "--no-progress"] + extra)
    print(f"{name}: cold train {seconds:.1f} s", flush=True)
    print("  " + "\n  ".join(line for line in output.splitlines() if line.startswith(("features", "damaged", "head:"))), flush=True)
    return seconds


def evaluate(name: str, work: Path, cache: Path) -> dict:
    out = work / f"{name}-evaluation"
    seconds, _ = run_timed(CATDOG + ["evaluate", "--run", str(work / name), "--out", str(out), "--corruptions",
                                     "--cache-dir", str(cache)])
    print(f"{name}: evaluate --corruptions {seconds:.1f} s", flush=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=("default", "fast"))
    parser.add_argument("--work", default="/tmp/catdog-robustness", help="runs, caches and robustness.json")
    parser.add_argument("--order", default="before-first", choices=("before-first", "after-first"))
    parser.add_argument("--after", default="", help="extra train options of the after run, e.g. '--damage-views 1'")
    parser.add_argument("--no-train", action="store_true", help="reuse the runs in --work (no timings)")
    parser.add_argument("--eval-cache", default="", help="feature cache for the evaluations (one that already holds "
                        "the damaged validation photos' features saves their extraction); default: a copy of the "
                        "before run's cold cache in --work")
    arguments = parser.parse_args()
    data = require_shared_data() / "train"
    work = Path(arguments.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"robustness benchmark, preset {arguments.preset}, {machine_description()}", flush=True)
    recipes = {"before": ["--damage-views", "0"], "after": arguments.after.split()}
    order = ["before", "after"] if arguments.order == "before-first" else ["after", "before"]
    seconds = {}
    if not arguments.no_train:
        for name in order:
            seconds[name] = train_cold(name, work, data, arguments.preset, recipes[name])
    # The damaged features are the same for both runs (same backbone, preprocessing and damage): one cache, seeded
    # with the clean features a cold run computed.
    shared = Path(arguments.eval_cache) if arguments.eval_cache else work / "cache-evaluation"
    if not shared.exists():
        shutil.copytree(work / "cache-before", shared)
    metrics = {name: evaluate(name, work, shared) for name in ("before", "after")}
    configs = {name: json.loads((work / name / "config.json").read_text()) for name in ("before", "after")}
    results = {"preset": arguments.preset, "machine": machine_description(), "cold_train_seconds": seconds,
               "damage_views": {name: configs[name].get("damage_views", 0) for name in configs},
               "clean": {name: {"accuracy": m["accuracy"], "log_loss": m["log_loss"]} for name, m in metrics.items()},
               "corruptions": {name: m["corruptions"] for name, m in metrics.items()}}
    (work / "robustness.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    before, after = results["corruptions"]["before"], results["corruptions"]["after"]
    print(f"\npreset {results['preset']}: before = --damage-views {results['damage_views']['before']:g}, "
          f"after = --damage-views {results['damage_views']['after']:g}; {before['photos']} validation photos; "
          f"mirror view {before['mirror_view']}")
    print("| photos | severity | before accuracy | before log loss | after accuracy | after log loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    clean = results["clean"]
    print(f"| clean (evaluate: every photo mirrored) | | {clean['before']['accuracy']:.4f} | {clean['before']['log_loss']:.4f} "
          f"| {clean['after']['accuracy']:.4f} | {clean['after']['log_loss']:.4f} |")
    print(f"| clean (as predict) | | {before['clean']['accuracy']:.4f} | {before['clean']['log_loss']:.4f} "
          f"| {after['clean']['accuracy']:.4f} | {after['clean']['log_loss']:.4f} |")
    for old, new in zip(before["conditions"], after["conditions"]):
        unit = before["severities"][old["kind"]]["unit"]
        print(f"| {old['kind']} ({old['level']}) | {old['severity']:g} {unit} | {old['accuracy']:.4f} | {old['log_loss']:.4f} "
              f"| {new['accuracy']:.4f} | {new['log_loss']:.4f} |")
    for level in ("strong", "mild"):
        old, new = before[f"{level}_summary"], after[f"{level}_summary"]
        print(f"| mean over kinds ({level}) | | {old['mean_accuracy']:.4f} | {old['mean_log_loss']:.4f} "
              f"| {new['mean_accuracy']:.4f} | {new['mean_log_loss']:.4f} |")
        print(f"| lowest ({level}) | | {old['min_accuracy']:.4f} ({old['worst_kind']}) | | "
              f"{new['min_accuracy']:.4f} ({new['worst_kind']}) | |")
    seconds = results["cold_train_seconds"]
    if seconds:
        print(f"\ncold catdog train: before {seconds['before']:.0f} s, after {seconds['after']:.0f} s, "
              f"ratio {seconds['after'] / seconds['before']:.2f}")


if __name__ == "__main__":
    main()
