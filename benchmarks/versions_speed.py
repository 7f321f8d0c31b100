"""Folder predict and serve: this checkout against a baseline commit, on one model file, in one invocation (issue 24).

    python benchmarks/versions_speed.py --run RUN [--baseline 975c8dc] [--photos DIR] [--rounds 3]
        [--seconds 10] [--levels 1 4 16]

The run's model.onnx is exported once by this checkout; both sides run that same file (`--model`), each with its
own defaults (the baseline: 4 photos per batch, the orientation check on; this checkout: the batch size measured on
this machine, the check off) and its own cache folder. The baseline runs from a temporary git worktree with
PYTHONPATH. Rounds alternate the sides: folder predict (photos/s from the command's own line, after one untimed
call that makes the measurement and fills the caches), then `catdog serve --model` under 1, 4 and 16 closed-loop
clients (serve_load.py's client). Prints each round and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_description, require_shared_data, run_timed
from serve_load import closed_loop, free_port, multipart, wait_ready

RATE = re.compile(r"\(([\d.]+) images/s\)")


def predict_rate(env: dict, model: Path, photos: Path, out: Path) -> float:
    _, output = run_timed([sys.executable, "-m", "catdog.cli", "predict", "--model", str(model), str(photos),
                           "--output", str(out), "--no-progress"], env)
    return float(RATE.search(output)[1])


def serve_rates(env: dict, model: Path, bodies: list, levels: list[int], seconds: float) -> dict[int, dict]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "catdog.cli", "serve", "--model", str(model), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, "/ready")
        closed_loop(port, bodies, 4, 2.0)  # warm-up
        return {level: closed_loop(port, bodies, level, seconds) for level in levels}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run (its model.onnx is exported by this checkout)")
    parser.add_argument("--baseline", default="975c8dc")
    parser.add_argument("--photos", default="", help="folder for predict; default: the shared originals (800)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    arguments = parser.parse_args()
    photos = Path(arguments.photos) if arguments.photos else require_shared_data().parent / "dogs-vs-cats-originals"
    bodies = [multipart(path.read_bytes(), path.name) for path in sorted(photos.glob("*.jpg"))[:64]]
    print(machine_description())
    import os

    with tempfile.TemporaryDirectory(prefix="catdog-versions-") as scratch_name:
        scratch = Path(scratch_name)
        model = scratch / "model.onnx"
        run_timed([sys.executable, "-m", "catdog.cli", "export", "--run", arguments.run, "--out", str(model)])
        worktree = scratch / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), arguments.baseline],
                       check=True, capture_output=True)
        base = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        sides = {"baseline": {**base, "PYTHONPATH": str(worktree / "src"), "CATDOG_CACHE": str(scratch / "cache-baseline")},
                 "current": {**base, "CATDOG_CACHE": str(scratch / "cache-current")}}
        try:
            for name, env in sides.items():  # untimed: the batch-size measurement, disk caches
                predict_rate(env, model, photos, scratch / f"{name}.csv")
            results = {name: {"predict": [], "serve": []} for name in sides}
            for round_number in range(arguments.rounds):
                for name, env in sides.items():
                    rate = predict_rate(env, model, photos, scratch / f"{name}.csv")
                    served = serve_rates(env, model, bodies, arguments.levels, arguments.seconds)
                    results[name]["predict"].append(rate)
                    results[name]["serve"].append(served)
                    print(f"round {round_number + 1} {name:>8}: predict {rate:5.1f} photos/s; serve "
                          + "; ".join(f"{level} clients {s['requests_per_second']:.1f}/s p99 {s['p99_ms']:.0f} ms"
                                      f"{' errors ' + str(s['errors']) if s['errors'] else ''}"
                                      for level, s in served.items()), flush=True)
            median = statistics.median
            current, baseline = results["current"], results["baseline"]
            print(f"folder predict, current / baseline: {median(current['predict']) / median(baseline['predict']):.3f}x "
                  f"({median(current['predict']):.1f} against {median(baseline['predict']):.1f} photos/s)")
            for level in arguments.levels:
                throughput = [median(r[level]["requests_per_second"] for r in side["serve"]) for side in (current, baseline)]
                p99 = [median(r[level]["p99_ms"] for r in side["serve"]) for side in (current, baseline)]
                print(f"serve at {level} clients, current / baseline: throughput {throughput[0] / throughput[1]:.3f}x "
                      f"({throughput[0]:.1f} against {throughput[1]:.1f}/s), p99 {p99[0] / p99[1]:.3f}x "
                      f"({p99[0]:.0f} against {p99[1]:.0f} ms)")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)


if __name__ == "__main__":
    main()
