"""What the out-of-distribution score costs (issue 17): folder predict and serve with and without it, same invocation.

"Without" is the same run as it was before catdog 0.5: a copy of the run folder without its bank of training
features (`ood.safetensors`) and without the meta.json fields that describe the score (`ood_method`,
`ood_threshold`, `ood_keep`, `ood_validation_scores`: absent, as in a run trained before them), and without any
model.onnx, so it is exported afresh (no `ood_score` output). Both runs are exported once, untimed, before anything
is measured, and the CSV header and the server's answer are checked to have (and not have) the score.

- Folder predict: `catdog predict --run RUN FOLDER`, a fresh process per measurement, on the 500 test1 photos
  upscaled to 500x375 (as benchmarks/predict_throughput.py), the two contenders interleaved over `--rounds` rounds
  (the order alternating, AB BA AB ...); the median photos/s and CPU seconds per photo (the child process's, which a
  busy machine moves less than wall time), and their ratios with/without.
- In-process inference (no start-up, no decoding): `Predictor.predict_batch` one photo at a time, as predict runs
  it on a CPU, the two predictors alternating photo by photo; median wall and CPU milliseconds per photo. Also each
  model asked for its logits alone (`Predictor.logits`, what the mirror view asks for): ONNX Runtime runs the whole
  graph whatever outputs are asked for, so the score costs there too.
- Serve: both `catdog serve --run ...` processes started side by side (the idle one waits on its socket), then for
  `--serve-rounds` rounds, at 1, 4 and 16 closed-loop clients (benchmarks/serve_load.py) for `--seconds` each, the
  two alternating (the order flipping each time); requests/s (median of the rounds), p50 and p99 latency (of all
  the rounds' answers pooled; the per-round medians beside them), and the server's CPU milliseconds per request.

The spread between rounds of one contender is the noise the with/without ratios are to be read against.

`--compare orientation` measures the orientation check the same way instead (`probabilities.OrientationCheck`): the
same run with the check (the default) against `--no-check-orientation`, in predict, in process and in serve.

    python benchmarks/ood_speed.py [--run RUN] [--compare ood|orientation] [--rounds 8] [--serve-rounds 4] [--seconds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data  # noqa: E402
from predict_throughput import catdog_predict, cpu_seconds, make_resized_photos, train_default_run  # noqa: E402
from serve_load import closed_loop, free_port, multipart, wait_ready  # noqa: E402

OOD_META_FIELDS = ("ood_method", "ood_threshold", "ood_keep", "ood_validation_scores")
WITH, WITHOUT = "with the score", "without (as before)"
CHECK, NO_CHECK = "orientation check", "no orientation check"


def copy_without_ood(run: Path, target: Path) -> Path:
    """The run as catdog 0.4 left it: no bank, no score fields in meta.json, no (stale) exported file."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("ood.safetensors", "model.onnx", "tensorboard"))
    meta = json.loads((target / "meta.json").read_text())
    for key in OOD_META_FIELDS:
        meta.pop(key, None)
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    return target


def csv_header(path: Path) -> list[str]:
    with open(path) as stream:
        return stream.readline().strip().split(",")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values) -> float:
    return statistics.median(values)


def spread(values, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def measure_predict(runs: dict[str, Path], folder: Path, scratch: Path, rounds: int,
                    options: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    figures = {name: {"rate": [], "cpu": []} for name in runs}
    names = list(runs)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            before = cpu_seconds()
            seconds, count = catdog_predict(runs[name], folder, scratch / "predict.csv", *options[name])
            figures[name]["rate"].append(count / seconds)
            figures[name]["cpu"].append((cpu_seconds() - before) / count)
            print(f"predict round {round_index + 1}: {name:20s} {count} photos in {seconds:5.1f} s = {count / seconds:5.1f}/s, "
                  f"{1e3 * figures[name]['cpu'][-1]:.1f} ms CPU per photo", flush=True)
    return figures


def measure_in_process(runs: dict[str, Path], folder: Path, photos: int,
                       options: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    from catdog.runtime.images import load_image
    from catdog.model_files import open_model

    predictors = {name: open_model(run=str(run)) for name, run in runs.items()}
    first = next(iter(predictors.values()))
    arrays = np.stack([first.transform.array(load_image(path, draft_size=first.preprocess.resize_size))
                       for path in sorted(folder.glob("*.jpg"))[:photos]])
    for predictor in predictors.values():  # first-call allocations
        predictor.predict_batch(arrays[:1])
    def batch_call(name: str, predictor):
        check = "--no-check-orientation" not in options[name]
        return lambda images: predictor.predict_batch(images, check_orientation=check)

    calls = {**{name: batch_call(name, predictor) for name, predictor in predictors.items()},
             **{f"{name}, logits only": predictor.logits for name, predictor in predictors.items()}}
    figures = {name: {"wall": [], "cpu": []} for name in calls}
    names = list(calls)
    for index in range(len(arrays)):
        for name in names if index % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name](arrays[index : index + 1])
            figures[name]["wall"].append(time.perf_counter() - wall)
            figures[name]["cpu"].append(time.process_time() - cpu)
    return figures


def check_answer(port: int, body: tuple[bytes, str], has_score: bool) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body[0], headers={"Content-Type": body[1]})
    answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    if (answer.get("ood_score") is not None) != has_score:
        raise RuntimeError(f"serve on port {port}: expected {'a' if has_score else 'no'} ood_score, got {answer}")


def measure_serve(runs: dict[str, Path], bodies: list, levels: list[int], rounds: int, seconds: float,
                  options: dict[str, list[str]]) -> dict:
    servers = {}
    try:
        for name, run in runs.items():
            port = free_port()
            process = subprocess.Popen(CATDOG + ["serve", "--run", str(run), "--port", str(port), *options[name]],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers[name] = (port, process)
        for name, (port, process) in servers.items():
            wait_ready(port, "/ready")
            check_answer(port, bodies[0], name != WITHOUT)
            closed_loop(port, bodies, 4, 3)  # warm-up
        results = {(name, clients): [] for name in runs for clients in levels}
        names = list(runs)
        flip = 0
        for round_index in range(rounds):
            for clients in levels:
                for name in names if flip % 2 == 0 else names[::-1]:
                    port, process = servers[name]
                    cpu = process_cpu_seconds(process.pid)
                    result = closed_loop(port, bodies, clients, seconds, keep_latencies=True)
                    result["cpu_ms_per_request"] = 1e3 * (process_cpu_seconds(process.pid) - cpu) / max(result["ok"], 1)
                    results[(name, clients)].append(result)
                    print(f"serve round {round_index + 1}: {name:20s} {clients:2d} clients {result['requests_per_second']:6.1f} req/s, "
                          f"p50 {result['p50_ms']:6.1f} ms, p99 {result['p99_ms']:6.1f} ms, {result['errors']} errors, "
                          f"{result['cpu_ms_per_request']:.1f} ms CPU/request", flush=True)
                flip += 1
        return results
    finally:
        for port, process in servers.values():
            process.terminate()
            process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="a default run (with its ood.safetensors); empty: train one (cached features)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved folder-predict rounds of each contender")
    parser.add_argument("--in-process-photos", type=int, default=200, help="photos for the in-process comparison (0: skip)")
    parser.add_argument("--serve-rounds", type=int, default=4, help="interleaved serve rounds (0: skip serve)")
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds of load per serve measurement")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent serve clients")
    parser.add_argument("--compare", choices=("ood", "orientation"), default="ood",
                        help="ood: the run with and without its score; orientation: with and without the orientation check")
    arguments = parser.parse_args()
    data = require_shared_data()
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="catdog-ood-speed-") as scratch:
        scratch = Path(scratch)
        run = Path(arguments.run) if arguments.run else train_default_run(data, scratch / "run")
        if json.loads((run / "meta.json").read_text()).get("ood_method") != "knn" or not (run / "ood.safetensors").is_file():
            sys.exit(f"{run}: not a run with the kNN out-of-distribution score (ood_method knn, ood.safetensors)")
        if arguments.compare == "ood":
            runs = {WITH: run, WITHOUT: copy_without_ood(run, scratch / "run-without-ood")}
            options = {WITH: [], WITHOUT: []}
        else:
            runs, options = {CHECK: run, NO_CHECK: run}, {CHECK: [], NO_CHECK: ["--no-check-orientation"]}
        ours, baseline = list(runs)
        folder = make_resized_photos(data / "test1", scratch / "photos", 500, (500, 375))
        for name, path in runs.items():  # first use: exports each run's ONNX file (untimed); check the score's presence
            catdog_predict(path, folder, scratch / "warmup.csv", *options[name])
            if ("ood_score" in csv_header(scratch / "warmup.csv")) != (name != WITHOUT):
                raise RuntimeError(f"{name}: predict's CSV header is {csv_header(scratch / 'warmup.csv')}")
        predict = measure_predict(runs, folder, scratch, arguments.rounds, options)
        in_process = (measure_in_process(runs, folder, arguments.in_process_photos, options)
                      if arguments.in_process_photos else None)
        bodies = [multipart(path.read_bytes()) for path in sorted((data / "test1").glob("*.jpg"))[:50]]
        serve = (measure_serve(runs, bodies, arguments.levels, arguments.serve_rounds, arguments.seconds, options)
                 if arguments.serve_rounds else None)

    print(f"\nmachine: {machine_description()}; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    print(f"\nfolder predict (`catdog predict --run RUN FOLDER`, fresh process, 500 photos at 500x375, start-up included), "
          f"median of {arguments.rounds} interleaved rounds:")
    print(f"{'':22s} {'photos/s':>9s} {'rounds (min-max)':>17s} {'CPU ms/photo':>13s} {'rounds (min-max)':>17s}")
    for name, values in predict.items():
        print(f"{name:22s} {median(values['rate']):9.1f} {spread(values['rate']):>17s} {1e3 * median(values['cpu']):13.1f} "
              f"{spread([1e3 * v for v in values['cpu']]):>17s}")
    rate_ratio = median(predict[ours]["rate"]) / median(predict[baseline]["rate"])
    cpu_ratio = median(predict[baseline]["cpu"]) / median(predict[ours]["cpu"])
    pairs = [a / b for a, b in zip(predict[ours]["rate"], predict[baseline]["rate"])]
    print(f"with/without: photos/s {rate_ratio:.3f}x (per round {', '.join(f'{p:.3f}' for p in pairs)}; median "
          f"{median(pairs):.3f}); photos per CPU second {cpu_ratio:.3f}x (target >= 0.95x)")
    if in_process:
        print(f"\nin-process inference, `predict_batch` one photo at a time (no start-up, no decoding), "
              f"{arguments.in_process_photos} photos alternating:")
        for name, values in in_process.items():
            print(f"{name:34s} wall {1e3 * median(values['wall']):6.2f} ms/photo, CPU {1e3 * median(values['cpu']):6.2f} ms/photo")
        for suffix in ("", ", logits only"):
            mine, before = in_process[ours + suffix], in_process[baseline + suffix]
            print(f"with/without{suffix}: wall {median(mine['wall']) / median(before['wall']):.3f}x the time, "
                  f"CPU {median(mine['cpu']) / median(before['cpu']):.3f}x")
    if serve:
        print(f"\nserve (`catdog serve --run RUN`, closed loop on 127.0.0.1, {arguments.seconds:.0f} s per measurement, "
              f"{arguments.serve_rounds} interleaved rounds; req/s: median (min-max) of the rounds; p50/p99: all rounds' "
              "answers pooled, [per-round median]):")
        print(f"{'':22s} {'clients':>7s} {'req/s':>8s} {'(min-max)':>13s} {'p50 ms':>7s} {'[rounds]':>8s} {'p99 ms':>7s} "
              f"{'[rounds]':>8s} {'CPU ms/req':>10s} {'errors':>6s}")
        pooled = {}
        for (name, clients), results in serve.items():
            latencies = 1e3 * np.concatenate([r["latencies"] for r in results])
            pooled[(name, clients)] = {"rps": median([r["requests_per_second"] for r in results]),
                                       "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                                       "cpu": median([r["cpu_ms_per_request"] for r in results])}
            p = pooled[(name, clients)]
            print(f"{name:22s} {clients:7d} {p['rps']:8.1f} {spread([r['requests_per_second'] for r in results]):>13s} "
                  f"{p['p50']:7.1f} {median([r['p50_ms'] for r in results]):8.1f} {p['p99']:7.1f} "
                  f"{median([r['p99_ms'] for r in results]):8.1f} {p['cpu']:10.1f} {sum(r['errors'] for r in results):6d}")
        for clients in arguments.levels:
            mine, before = pooled[(ours, clients)], pooled[(baseline, clients)]
            per_round = [a["requests_per_second"] / b["requests_per_second"] for a, b in zip(serve[(ours, clients)], serve[(baseline, clients)])]
            print(f"with/without, {clients:2d} clients: throughput {mine['rps'] / before['rps']:.3f}x (per round "
                  f"{', '.join(f'{p:.2f}' for p in per_round)}), p50 {mine['p50'] / before['p50']:.3f}x, "
                  f"p99 {mine['p99'] / before['p99']:.3f}x, CPU per request {mine['cpu'] / before['cpu']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
