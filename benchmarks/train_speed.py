"""A cold `catdog train` (default preset, the 6,000 shared photos, empty cache) against a baseline commit, in one
invocation on the machine at hand (issue 24).

    python benchmarks/train_speed.py [--baseline 975c8dc] [--rounds 1] [--data DIR]

The baseline is checked out into a temporary git worktree and run from its own sources (PYTHONPATH) with this
virtual environment; the current tree runs as installed. Rounds alternate baseline and current, each with a fresh
cache folder. The baseline runs twice a round: as it was (its default preset filtered noisy photos) and with
`--denoise-above 0`, the preprocessing the current default uses. Prints wall time, the feature extraction's time and views/s, the batch size chosen, the validation
accuracy and log loss of each, the ratios, and the network's own best forward rate on this machine (ONNX Runtime on
random images, the backbone the extraction runs), so the extraction's share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_description, require_shared_data, run_timed

FEATURES_LINE = re.compile(r"features: (\d+) images x (\d+) views at \d+ px in ([\d.]+) s \((\d+) computed")


def train_once(label: str, data: Path, scratch: Path, source: Path | None, extra: list[str]) -> dict:
    cache, out = scratch / f"cache-{label}", scratch / f"run-{label}"
    env = {"CATDOG_CACHE": str(cache)}
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    seconds, output = run_timed([sys.executable, "-m", "catdog.cli", "train", "--data", str(data), "--out", str(out),
                                 "--no-progress", *extra], env)
    found = FEATURES_LINE.search(output)
    images, views, extraction, computed = (int(found[1]), int(found[2]), float(found[3]), int(found[4])) if found else (0, 0, 0.0, 0)
    meta = json.loads((out / "meta.json").read_text())
    chosen = re.search(r"from cache\), (batch size \d+ \([^)]*\))", output)
    return {"label": label, "seconds": seconds, "extraction_seconds": extraction,
            "views_per_second": computed * views / extraction if extraction else 0.0,
            "accuracy": meta["metrics"]["accuracy"], "log_loss": meta["metrics"]["log_loss"],
            "batch_size": chosen[1] if chosen else "64 (fixed)", "cache": cache, "model": meta["model_name"],
            "size": meta["preprocess"]["input_size"]}


def network_best_rate(cache: Path, model: str, size: int) -> dict[int, float]:
    """The exported backbone the current run extracted with, alone, at each batch size (1 s per size)."""
    from catdog.runtime.batch_size import CPU_CANDIDATES, measure_rates
    from catdog.runtime.inference import session_options

    import onnxruntime

    (path,) = [p for p in (cache / "onnx").glob(f"{model}-backbone-{size}-*.onnx")]
    session = onnxruntime.InferenceSession(str(path), session_options(os.cpu_count()), providers=["CPUExecutionProvider"])
    return measure_rates(lambda batch: session.run(None, {"images": batch}), (3, size, size), CPU_CANDIDATES, seconds=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="975c8dc", help="git commit to compare with (0.5.2)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data", default="", help="labelled photos; default: the shared 6,000")
    arguments = parser.parse_args()
    data = Path(arguments.data) if arguments.data else require_shared_data() / "train"
    print(machine_description())
    with tempfile.TemporaryDirectory(prefix="catdog-train-speed-") as scratch_name:
        scratch = Path(scratch_name)
        worktree = scratch / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), arguments.baseline],
                       check=True, capture_output=True)
        try:
            results = []
            # The baseline as it was (its default preset filtered noisy photos) and with the filter off, the current
            # default, so the speed is compared on the same preprocessing too.
            sides = [("baseline", worktree, []), ("baseline-nofilter", worktree, ["--denoise-above", "0"]),
                     ("current", None, [])]
            for round_number in range(arguments.rounds):
                for label, source, extra in sides:
                    result = train_once(f"{label}-{round_number}", data, scratch, source, extra)
                    results.append(result)
                    print(f"{result['label']:>12}: {result['seconds']:6.1f} s; extraction {result['extraction_seconds']:6.1f} s "
                          f"at {result['views_per_second']:5.1f} views/s ({result['batch_size']}); "
                          f"validation {result['accuracy']:.2%}, log loss {result['log_loss']:.4f}", flush=True)
            current = [r for r in results if r["label"].startswith("current-")]
            mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            for name in ("baseline", "baseline-nofilter"):
                baseline = [r for r in results if r["label"].startswith(name + "-")]
                print(f"cold train time: current / {name} = {mean(current, 'seconds') / mean(baseline, 'seconds'):.3f}; "
                      f"extraction views/s current / {name} = "
                      f"{mean(current, 'views_per_second') / mean(baseline, 'views_per_second'):.3f}")
            rates = network_best_rate(current[-1]["cache"], current[-1]["model"], current[-1]["size"])
            best = max(rates.values())
            print("network alone, images/s by batch size: " + ", ".join(f"{s}: {r:.1f}" for s, r in rates.items())
                  + f"; best {best:.1f}; the current extraction reached {mean(current, 'views_per_second') / best:.0%} of it")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)


if __name__ == "__main__":
    main()
