"""Closed-loop load on 127.0.0.1: `catdog serve` vs the tutorial-style Flask app, same machine, same invocation.

For 1, 4 and 16 concurrent clients, each client sends a photo, waits for the answer, and sends the next, for a
fixed time, after an untimed `catdog predict` that fills the ONNX cache as a first use would. Prints requests/s,
p50 and p99 latency, errors and the server's peak RSS (summed over its worker processes), and the ratios. With
--workers 1 2 it runs `catdog serve --workers N` for each N and also prints the ratios against one worker. With
--soak S it then holds 16 clients on catdog for S seconds and prints RSS at the start and end (memory must stay
flat), and sends every kind of bad input to check that none gets a 5xx. With --run RUN catdog serves that run
(`catdog serve --run RUN`) instead of the built-in model.

The clients set TCP_NODELAY, as urllib3 (requests) does by default: http.client writes the headers and a body over
2,920 bytes separately, and Nagle's algorithm could hold the second write until the server's delayed ACK.

    python benchmarks/serve_load.py [--seconds 15] [--soak 60] [--workers 1 2] [--run RUN]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data  # noqa: E402

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart(payload: bytes, filename: str = "photo.jpg", field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Memory of a server: the process and, with --workers, its worker processes, summed."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            total += int(line.split()[1]) / 1024
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                total += rss_mb(int(child), field)
            except OSError:  # exited meanwhile
                pass
    return total


def connect(port: int) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def wait_ready(port: int, path: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not ready")


def closed_loop(port: int, bodies: list[tuple[bytes, str]], clients: int, seconds: float, keep_latencies: bool = False) -> dict:
    """requests/s, p50 and p99 latency (ms), errors and answers of `clients` closed-loop clients for `seconds`;
    keep_latencies: also every answer's latency in seconds (`latencies`), to pool several measurements."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(offset: int) -> None:
        connection = connect(port)
        index = offset
        while time.perf_counter() < stop_at:
            body, content_type = bodies[index % len(bodies)]
            index += 1
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = connect(port)
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    values = np.array(latencies) if latencies else np.array([float("nan")])
    result = {"requests_per_second": len(latencies) / wall, "p50_ms": 1000 * float(np.percentile(values, 50)),
              "p99_ms": 1000 * float(np.percentile(values, 99)), "errors": errors[0], "ok": len(latencies)}
    return {**result, "latencies": latencies} if keep_latencies else result


def bad_inputs_check(port: int) -> dict[str, int]:
    from PIL import Image
    import io

    big = io.BytesIO()
    Image.effect_noise((64, 64), 30).convert("RGB").save(big, format="JPEG")
    cases = {
        "html as .jpg": multipart(b"<html><body>hi</body></html>"),
        "empty": multipart(b""),
        "truncated": multipart(big.getvalue()[:300]),
        "random bytes": multipart(os.urandom(4000)),
        "11 MB": multipart(b"\xff\xd8" + b"\x00" * (11 * 1024 * 1024)),
        "wrong field": multipart(big.getvalue(), field="image"),
    }
    statuses = {}
    for name, (body, content_type) in cases.items():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        statuses[name] = connection.getresponse().status
    return statuses


def serve_name(workers: int) -> str:
    return "catdog serve" if workers == 1 else f"catdog serve --workers {workers}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--soak", type=float, default=0.0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="catdog serve --workers N, for each N")
    parser.add_argument("--run", default="", help="a run for catdog to serve (--run RUN); empty: the built-in model")
    arguments = parser.parse_args()
    data = require_shared_data()
    bodies = [multipart(path.read_bytes()) for path in sorted((data / "test1").glob("*.jpg"))[:50]]
    model = ["--run", arguments.run] if arguments.run else []
    servers = {serve_name(workers): CATDOG + ["serve", "--port", "{port}", "--workers", str(workers), *model]
               for workers in arguments.workers}
    servers["tutorial Flask app"] = [sys.executable, str(HERE / "tutorial_flask_app.py"), "{port}"]
    # A first use exports the model to ONNX and caches it; do that once, untimed, so the server's peak RSS measures
    # serving rather than the one-time export inside the server process.
    subprocess.run(CATDOG + ["predict", *model, str(sorted((data / "test1").glob("*.jpg"))[0]), "--output", os.devnull, "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    soak = None
    for name, command in servers.items():
        port = free_port()
        process = subprocess.Popen([part.format(port=port) for part in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, "/ready" if name.startswith("catdog") else "/health")
            closed_loop(port, bodies, 4, 3)  # warm-up
            for clients in arguments.levels:
                results[(name, clients)] = {**closed_loop(port, bodies, clients, arguments.seconds), "peak_rss_mb": rss_mb(process.pid, "VmHWM")}
                print(name, clients, results[(name, clients)], flush=True)
            if name == serve_name(arguments.workers[0]) and arguments.soak:
                before = rss_mb(process.pid)
                load = closed_loop(port, bodies, 16, arguments.soak)
                soak = {"seconds": arguments.soak, "rss_start_mb": before, "rss_end_mb": rss_mb(process.pid), **load,
                        "bad_inputs": bad_inputs_check(port), "alive": process.poll() is None}
                print("soak", soak, flush=True)
        finally:
            process.terminate()
            process.wait(30)
    print(f"\nmachine: {machine_description()}")
    print(f"{'server':28s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'peak RSS MB':>12s}")
    for (name, clients), r in results.items():
        print(f"{name:28s} {clients:7d} {r['requests_per_second']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d} {r['peak_rss_mb']:12.0f}")
    for workers in arguments.workers:
        for clients in arguments.levels:
            ours, theirs = results[(serve_name(workers), clients)], results[("tutorial Flask app", clients)]
            print(f"{serve_name(workers)} vs tutorial Flask app, {clients:2d} clients: throughput ratio "
                  f"{ours['requests_per_second'] / theirs['requests_per_second']:.1f}x, p99 ratio {ours['p99_ms'] / theirs['p99_ms']:.2f}")
    if 1 in arguments.workers:
        for workers in [n for n in arguments.workers if n != 1]:
            for clients in arguments.levels:
                many, one = results[(serve_name(workers), clients)], results[(serve_name(1), clients)]
                print(f"{workers} workers vs 1, {clients:2d} clients: throughput ratio "
                      f"{many['requests_per_second'] / one['requests_per_second']:.2f}x, p50 ratio {many['p50_ms'] / one['p50_ms']:.2f}, "
                      f"p99 ratio {many['p99_ms'] / one['p99_ms']:.2f}")
    if soak:
        print(f"soak {soak['seconds']:.0f} s at 16 clients: {soak['requests_per_second']:.1f} req/s, {soak['errors']} errors, "
              f"RSS {soak['rss_start_mb']:.0f} -> {soak['rss_end_mb']:.0f} MB; bad inputs -> {json.dumps(soak['bad_inputs'])}; "
              f"alive: {soak['alive']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
