"""`catdog serve` as a real process: binds to 127.0.0.1, and on SIGTERM finishes in-flight requests, then exits."""

from __future__ import annotations

import http.client
import io
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import colour_image, make_kaggle_folder
from test_browser import free_port

from catdog.train import TrainConfig, train


def multipart_files(count: int) -> tuple[bytes, str]:
    boundary = "catdogboundary"
    parts = []
    for i in range(count):
        buffer = io.BytesIO()
        colour_image(i % 2, i, (1200, 900)).save(buffer, format="JPEG")
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.jpg\"\r\n"
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + buffer.getvalue() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def server_process(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="simple_cnn", strategy="finetune", epochs=1,
                      batch_size=8, image_size=32, num_workers=0, progress=False), log=lambda _: None)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "catdog.cli", "serve", "--run", str(tmp_path / "run"), "--port",
                                str(port), "--backend", "torch"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.3)
    yield process, port
    if process.poll() is None:
        process.kill()


def test_sigterm_lets_in_flight_requests_finish(server_process):
    process, port = server_process
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
    log = process.stdout.read().decode(errors="replace")
    assert "127.0.0.1" in log  # bound to loopback by default
