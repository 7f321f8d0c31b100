"""`catdog serve` as a real process: binds to 127.0.0.1, and on SIGTERM finishes in-flight requests, then exits;
`--run` exports the run on the fly and serves that file."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import colour_image
from PIL import Image
from test_browser import free_port

import catdog
from catdog.runtime.model_file import load_model_file
from catdog.runtime.runs import weights_digest


def multipart_files(count: int) -> tuple[bytes, str]:
    boundary = "catdogboundary"
    parts = []
    for i in range(count):
        buffer = io.BytesIO()
        colour_image(i % 2, i, (1200, 900)).save(buffer, format="JPEG")
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.jpg\"\r\n"
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + buffer.getvalue() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@contextmanager
def serving(arguments: list[str], log_path: Path, timeout: float = 180):
    """`catdog serve ARGUMENTS --port P` started and ready: yields (process, port); always stopped afterwards."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "catdog.cli", "serve", *arguments, "--port", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + timeout
        while True:
            assert process.poll() is None, f"catdog serve exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.time() < deadline, f"catdog serve was not ready in {timeout} s:\n{log_path.read_text()}"
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/ready")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


@pytest.fixture
def server_process(served_run, tmp_path):
    with serving(["--model", str(served_run[1])], tmp_path / "serve.log") as (process, port):
        yield process, port, tmp_path / "serve.log"


def test_sigterm_lets_in_flight_requests_finish(server_process):
    process, port, log_path = server_process
    body, content_type = multipart_files(24)
    outcome = {}

    def slow_request():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/predict/batch", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        outcome["status"] = response.status
        outcome["body"] = json.loads(response.read())

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)  # the request is being received and decoded
    process.send_signal(signal.SIGTERM)
    thread.join(60)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is the signal's (as a process
    # manager expects); what matters is that it exits, and only after finishing the request.
    assert process.wait(60) in (0, -signal.SIGTERM)
    assert outcome["status"] == 200 and outcome["body"]["count"] == 24 and outcome["body"]["failed"] == 0
    assert [result["label"] for result in outcome["body"]["results"]] == ["cat", "dog"] * 12  # in order, right
    log = log_path.read_text(errors="replace")
    assert "127.0.0.1" in log  # bound to loopback by default


def predict(port: int, photo: bytes) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/predict", body=photo, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    assert response.status == 200
    return json.loads(response.read())


@pytest.mark.slow
def test_serve_run_exports_the_run_first(served_run, tmp_path):
    """`catdog serve --run RUN` for a run without a model.onnx: the CLI exports it into the cache, then serves that
    file, answering exactly as the file does (and as the run's own export)."""
    run_dir, model_file = served_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("model.onnx"))
    cache = tmp_path / "cache"
    buffer = io.BytesIO()
    colour_image(1, 42, (160, 120)).save(buffer, format="JPEG")
    photo = buffer.getvalue()
    with serving(["--run", str(run), "--cache-dir", str(cache)], tmp_path / "serve.log") as (_, port):
        answer = predict(port, photo)
    exported = sorted((cache / "models").glob("*.onnx")) if (cache / "models").is_dir() else []
    assert [path.name for path in exported] == [f"run-{weights_digest(run)[:20]}-catdog{catdog.__version__}.onnx"]
    assert not (run / "model.onnx").exists()  # the run directory is left as it was
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    expected = load_model_file(exported[0]).predict_pil([image])[0]
    assert expected.tolist() == pytest.approx(load_model_file(model_file).predict_pil([image])[0].tolist(), abs=1e-5)
    assert answer["label"] == "dog"
    assert [answer["probabilities"][name] for name in ("cat", "dog")] == pytest.approx(expected.tolist(), abs=1e-5)
