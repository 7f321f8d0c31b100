"""The runtime's footprint (issue 18): today's full install against the runtime-only install, on one trained run.

Baseline: commit df866f0 (before the split), checked out with `git worktree add` into a temporary folder and run
with PYTHONPATH=<worktree>/src in this checkout's full .venv: `catdog serve --run RUN`, `catdog predict --run RUN`.
Runtime: a fresh virtual environment with this checkout installed without extras (as tests/test_runtime_install.py
and the Dockerfile install it): `catdog serve --model model.onnx`, `catdog predict --model model.onnx`, model.onnx
exported from RUN by this checkout (`catdog export --run RUN --format onnx`).

Printed, for each side: the environment's size on disk (du), seconds from starting `catdog serve` to the first 200
from /ready (median of --repeats starts), the server's RSS at rest (once ready) and after --requests sequential
/predict requests (medians over the starts), and seconds of `catdog predict` on one photo from process start to
the CSV (median of --repeats). One untimed start and one untimed predict on each side come first, so that a first
use's one-off work (the baseline exports its ONNX file into the cache) and a cold disk cache count for neither.

Every server binds to 127.0.0.1 and is stopped in a finally, also when something fails; loops are bounded.

    python benchmarks/runtime_footprint.py --run runs/demo
    python benchmarks/runtime_footprint.py --make-run            # trains runs/footprint first (300 shared photos)
    python benchmarks/runtime_footprint.py --run R --runtime-venv /tmp/rt --model model.onnx   # reuse both
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "dogs-vs-cats"
FULL_VENV = ROOT / ".venv"
BASELINE_COMMIT = "df866f0"
READY_TIMEOUT_S = 300
COMMAND_TIMEOUT_S = 1800


# --- helpers --------------------------------------------------------------------------------------------------------

def disk_usage_mb(folder: Path) -> float:
    """What `du -s` counts: allocated blocks, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(folder):
        for name in [".", *files]:
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total / 2**20


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its child processes (uvicorn's workers), summed; from /proc."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                total += rss_mb(int(child))
            except OSError:  # exited meanwhile
                pass
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def multipart(photo: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{photo.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run(command: list[str], env: dict, cwd: Path, what: str) -> float:
    """Run a command to completion; its wall seconds. Exits with its output if it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {' '.join(command)}\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


class Side:
    """One install: how to run `catdog`, with which environment, and the arguments naming the model."""

    def __init__(self, name: str, catdog: list[str], env: dict, model_arguments: list[str], environment: Path):
        self.name = name
        self.catdog = catdog
        self.env = env
        self.model_arguments = model_arguments
        self.environment = environment


def base_environment(cache: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["CATDOG_CACHE"] = str(cache)
    return env


# --- the two installs -------------------------------------------------------------------------------------------

def add_baseline_worktree(folder: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), BASELINE_COMMIT], check=True,
                   capture_output=True, text=True, timeout=300)
    return folder


def remove_worktree(folder: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], capture_output=True,
                   timeout=300)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True, timeout=300)


def make_runtime_venv(folder: Path, scratch: Path) -> Path:
    """A fresh venv with this checkout and no extras: the build context's files copied, then `pip install`."""
    context = scratch / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, context / name)
    shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    env = base_environment(scratch / "cache")
    print(f"creating the runtime environment in {folder} ...", flush=True)
    run([sys.executable, "-m", "venv", str(folder)], env, scratch, "python -m venv")
    run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", str(context)], env, scratch,
        "pip install (no extras)")
    return folder


def make_run(baseline_src: Path, out: Path, photos: int, scratch: Path) -> None:
    """A quick run, trained by the baseline (a run from before the split, as a user upgrading has): `catdog train
    --preset fast` on the first `photos` shared photos (half cats, half dogs), via a folder of symlinks."""
    if not (SHARED_DATA / "train").is_dir():
        sys.exit(f"--make-run needs the shared Kaggle photos at {SHARED_DATA}")
    subset = scratch / "subset"
    subset.mkdir()
    for animal in ("cat", "dog"):
        for source in sorted(SHARED_DATA.joinpath("train").glob(f"{animal}.*.jpg"))[: photos // 2]:
            (subset / source.name).symlink_to(source)
    if not any(subset.iterdir()):
        sys.exit(f"no cat.*.jpg or dog.*.jpg photos in {SHARED_DATA / 'train'}")
    env = base_environment(scratch / "cache")
    env["PYTHONPATH"] = str(baseline_src)
    print(f"training {out} on {len(list(subset.iterdir()))} photos (baseline {BASELINE_COMMIT}, --preset fast) ...",
          flush=True)
    seconds = run([str(FULL_VENV / "bin" / "python"), "-m", "catdog.cli", "train", "--data", str(subset), "--out",
                   str(out), "--preset", "fast"], env, ROOT, "catdog train")
    print(f"trained in {seconds:.0f} s", flush=True)


def export_model(run_dir: Path, model: Path, scratch: Path) -> None:
    env = base_environment(scratch / "cache")
    env["PYTHONPATH"] = str(ROOT / "src")
    print(f"exporting {run_dir} to {model} (this checkout, full install) ...", flush=True)
    run([str(FULL_VENV / "bin" / "python"), "-m", "catdog.cli", "export", "--run", str(run_dir), "--format", "onnx",
         "--out", str(model)], env, scratch, "catdog export")


# --- measurements -----------------------------------------------------------------------------------------------

def serve_once(side: Side, photo: Path, requests: int, scratch: Path, servers: list) -> dict:
    """Start `catdog serve`, time it to the first 200 from /ready, then RSS at rest and after `requests` requests."""
    port = free_port()
    log = open(scratch / f"serve-{side.name}-{port}.log", "wb")
    started = time.perf_counter()
    server = subprocess.Popen([*side.catdog, "serve", *side.model_arguments, "--host", "127.0.0.1", "--port",
                               str(port)], env=side.env, cwd=scratch, stdout=log, stderr=subprocess.STDOUT)
    servers.append(server)
    try:
        ready_after = None
        while time.perf_counter() - started < READY_TIMEOUT_S and server.poll() is None:
            try:
                if get_status(port, "/ready") == 200:
                    ready_after = time.perf_counter() - started
                    break
            except OSError:
                pass
            time.sleep(0.05)
        if ready_after is None:
            log.flush()
            raise RuntimeError(f"{side.name}: no 200 from /ready within {READY_TIMEOUT_S} s (exit {server.poll()}):\n"
                               f"{Path(log.name).read_text(errors='replace')[-3000:]}")
        time.sleep(1.0)  # at rest
        at_rest = rss_mb(server.pid)
        body, content_type = multipart(photo)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(requests):
                connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"{side.name}: /predict answered {response.status}")
        finally:
            connection.close()
        return {"ready_s": ready_after, "rss_rest_mb": at_rest, "rss_after_mb": rss_mb(server.pid)}
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)


def predict_once(side: Side, photo: Path, scratch: Path) -> tuple[float, float]:
    """(seconds from start to CSV, peak RSS in MB) of `catdog predict` on one photo (GNU time's %M)."""
    output, peak = scratch / f"predict-{side.name}.csv", scratch / f"predict-{side.name}.rss"
    output.unlink(missing_ok=True)
    seconds = run(["/usr/bin/time", "-f", "%M", "-o", str(peak), *side.catdog, "predict", str(photo),
                   *side.model_arguments, "--output", str(output)], side.env, scratch, f"{side.name}: catdog predict")
    if not output.is_file():
        raise RuntimeError(f"{side.name}: catdog predict wrote no CSV")
    return seconds, int(peak.read_text().split()[-1]) / 1024


def measure(side: Side, photo: Path, repeats: int, requests: int, scratch: Path, servers: list) -> dict:
    print(f"{side.name}: sizing {side.environment} ...", flush=True)
    figures = {"size_mb": disk_usage_mb(side.environment)}
    print(f"{side.name}: one untimed start and predict, then {repeats} of each ...", flush=True)
    serve_once(side, photo, 1, scratch, servers)
    predict_once(side, photo, scratch)
    starts = [serve_once(side, photo, requests, scratch, servers) for _ in range(repeats)]
    for key in ("ready_s", "rss_rest_mb", "rss_after_mb"):
        figures[key] = statistics.median(start[key] for start in starts)
    predictions = [predict_once(side, photo, scratch) for _ in range(repeats)]
    figures["predict_s"] = statistics.median(seconds for seconds, _ in predictions)
    figures["predict_rss_mb"] = statistics.median(peak for _, peak in predictions)
    figures["help_s"] = statistics.median(run([*side.catdog, "--help"], side.env, scratch, f"{side.name}: catdog --help")
                                          for _ in range(repeats))
    return figures


def print_table(baseline: dict, runtime: dict, requests: int, repeats: int, run_dir: Path, model: Path,
                baseline_name: str = f"baseline {BASELINE_COMMIT} (full .venv, --run)") -> None:
    rows = [
        ("environment on disk (MB)", "size_mb", "{:.0f}"),
        (f"serve: start to first 200 from /ready (s, median of {repeats})", "ready_s", "{:.2f}"),
        ("serve: RSS at rest (MB)", "rss_rest_mb", "{:.0f}"),
        (f"serve: RSS after {requests} /predict (MB)", "rss_after_mb", "{:.0f}"),
        (f"predict, one photo, start to CSV (s, median of {repeats})", "predict_s", "{:.2f}"),
        ("predict, one photo, peak RSS (MB)", "predict_rss_mb", "{:.0f}"),
        (f"catdog --help (s, median of {repeats})", "help_s", "{:.2f}"),
    ]
    print()
    print(f"run {run_dir}; runtime model {model} ({model.stat().st_size / 2**20:.1f} MB); {os.cpu_count()} cores")
    print(f"| | {baseline_name} | runtime (no extras, --model) | runtime / baseline |")
    print("|---|---:|---:|---:|")
    for title, key, number in rows:
        ratio = runtime[key] / baseline[key] if baseline[key] else float("nan")
        print(f"| {title} | {number.format(baseline[key])} | {number.format(runtime[key])} | {ratio:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (with --make-run: where to train; default "
                                                 "runs/footprint)")
    parser.add_argument("--make-run", action="store_true", help="train a quick run first (kept if already there)")
    parser.add_argument("--photos", type=int, default=300, help="shared photos for --make-run")
    parser.add_argument("--model", type=Path, help="an exported model.onnx of the run (default: exported now)")
    parser.add_argument("--runtime-venv", type=Path, help="an existing runtime-only venv (default: a fresh one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--against", choices=("commit", "full-install"), default="commit",
                        help=f"commit: the baseline {BASELINE_COMMIT} from its worktree, --run RUN; full-install: this "
                             "checkout in the full .venv (catdog[all]), --model model.onnx, as issue 24 asks")
    arguments = parser.parse_args(argv)
    if arguments.run is None and not arguments.make_run:
        parser.error("give --run RUN (a trained run) or --make-run")
    if not (FULL_VENV / "bin" / "python").is_file():
        parser.error(f"needs the full install at {FULL_VENV} (make setup)")
    if not 1 <= arguments.repeats <= 20 or not 1 <= arguments.requests <= 10_000:
        parser.error("--repeats in 1..20, --requests in 1..10000")
    run_dir = (arguments.run or ROOT / "runs" / "footprint").resolve()

    servers: list[subprocess.Popen] = []
    scratch = Path(tempfile.mkdtemp(prefix="catdog-footprint-"))
    worktree = None
    try:
        worktree = add_baseline_worktree(scratch / "baseline")
        if arguments.make_run and not (run_dir / "model.safetensors").is_file():
            make_run(worktree / "src", run_dir, arguments.photos, scratch)
        if not run_dir.is_dir():
            sys.exit(f"no run at {run_dir}")
        model = arguments.model.resolve() if arguments.model else scratch / "model.onnx"
        if not arguments.model:
            export_model(run_dir, model, scratch)
        venv = arguments.runtime_venv.resolve() if arguments.runtime_venv else \
            make_runtime_venv(scratch / "runtime-venv", scratch)

        shared = sorted(SHARED_DATA.joinpath("train").glob("cat.*.jpg")) if SHARED_DATA.is_dir() else []
        photo = shared[-1] if shared else None  # the last cat: not among --make-run's photos
        if photo is None:
            from PIL import Image

            photo = scratch / "photo.jpg"
            Image.effect_noise((500, 375), 40).convert("RGB").save(photo)

        baseline_env = base_environment(scratch / "cache-baseline")
        baseline_env["PYTHONPATH"] = str(worktree / "src")
        baseline = Side("baseline", [str(FULL_VENV / "bin" / "python"), "-m", "catdog.cli"], baseline_env,
                        ["--run", str(run_dir)], FULL_VENV)
        baseline_name = f"baseline {BASELINE_COMMIT} (full .venv, --run)"
        if arguments.against == "full-install":
            full_env = base_environment(scratch / "cache-full")
            baseline = Side("full", [str(FULL_VENV / "bin" / "catdog")], full_env, ["--model", str(model)], FULL_VENV)
            baseline_name = "this checkout, full install (--model)"
        runtime_env = base_environment(scratch / "cache-runtime")
        runtime_env["PATH"] = os.pathsep.join([str(venv / "bin"), runtime_env.get("PATH", "")])
        runtime = Side("runtime", [str(venv / "bin" / "catdog")], runtime_env, ["--model", str(model)], venv)

        figures = {side.name: measure(side, photo, arguments.repeats, arguments.requests, scratch, servers)
                   for side in (baseline, runtime)}
        print_table(figures[baseline.name], figures["runtime"], arguments.requests, arguments.repeats, run_dir, model,
                    baseline_name)
        return 0
    finally:
        for server in servers:
            stop(server)
        if worktree is not None:
            remove_worktree(worktree)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
