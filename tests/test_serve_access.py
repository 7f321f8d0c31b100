"""The API key, X-Request-ID and `--workers`: in process through TestClient, and as a real two-worker server."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import colour_image
from fastapi.testclient import TestClient
from test_browser import free_port

from catdog.serve.access import is_loopback
from catdog.serve.app import ServeConfig, create_app, exposure_warning

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model_file(served_run):
    """The tiny run's exported model.onnx (conftest's `served_run`)."""
    return served_run[1]


@pytest.fixture(scope="module")
def keyed_client(model_file):
    with TestClient(create_app(ServeConfig(model=str(model_file), api_key=KEY))) as client:
        yield client


def jpeg() -> bytes:
    buffer = io.BytesIO()
    colour_image(1, 3, (40, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def upload() -> dict:
    return {"file": ("dog.jpg", jpeg(), "image/jpeg")}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}])
def test_protected_endpoints_refuse_a_missing_or_wrong_key(keyed_client, headers):
    for method, path, extra in [("POST", "/predict", {"files": upload()}), ("POST", "/predict/batch", {"files": upload()}),
                                ("POST", "/explain", {"files": upload()}), ("GET", "/metrics", {}),
                                ("GET", "/openapi.json", {}), ("GET", "/docs", {}), ("GET", "/no-such-path", {})]:
        response = keyed_client.request(method, path, headers=headers, **extra)
        assert response.status_code == 401, (path, headers)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == "unauthorized" and set(response.json()) == {"error", "detail"}


def test_the_right_key_opens_everything_and_health_ready_page_stay_open(keyed_client):
    authorized = {"Authorization": f"Bearer {KEY}"}
    answer = keyed_client.post("/predict", files=upload(), headers=authorized)
    assert answer.status_code == 200 and answer.json()["label"] == "dog"
    assert keyed_client.post("/predict/batch", files=upload(), headers=authorized).json()["count"] == 1
    explained = keyed_client.post("/explain", files=upload(), headers=authorized)  # the exported file's heatmaps
    assert explained.status_code == 200 and explained.json()["label"] == "dog" and explained.json()["overlay_png"]
    assert "catdog_requests_total" in keyed_client.get("/metrics", headers=authorized).text
    schema = keyed_client.get("/openapi.json", headers=authorized).json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["apiKey"]["description"]}
    assert schema["paths"]["/predict"]["post"]["security"] == [{"apiKey": []}]
    assert "401" in schema["paths"]["/predict"]["post"]["responses"]
    assert "security" not in schema["paths"]["/health"]["get"] and "401" not in schema["paths"]["/ready"]["get"]["responses"]
    assert keyed_client.get("/health").status_code == 200
    assert keyed_client.get("/ready").json()["ready"] is True
    page = keyed_client.get("/")
    assert page.status_code == 200
    # the page's one request helper sends the key (typed in, or given once as ?key=)
    assert 'headers["Authorization"] = `Bearer ${key}`' in page.text and 'await post(explain ? "explain" : "predict", form)' in page.text


def test_without_a_key_nothing_asks_for_one(model_file, monkeypatch):
    monkeypatch.delenv("CATDOG_API_KEY", raising=False)
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        assert client.post("/predict", files=upload()).status_code == 200
        schema = client.get("/openapi.json").json()
        assert "securitySchemes" not in schema.get("components", {})
        assert "401" not in schema["paths"]["/predict"]["post"]["responses"]


def test_key_from_the_environment_and_bad_keys(monkeypatch):
    monkeypatch.setenv("CATDOG_API_KEY", "from-env")
    assert ServeConfig().api_key == "from-env"
    assert ServeConfig(api_key="given").api_key == "given"
    with pytest.raises(ValueError, match="printable ASCII"):
        ServeConfig(api_key="two words")
    with pytest.raises(ValueError, match="--workers"):
        ServeConfig(workers=0)


def test_workers_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert ServeConfig().inference_threads is None  # one worker: one inference thread per physical core
    assert ServeConfig(workers=2).inference_threads == max(1, cores // 2)
    assert ServeConfig(workers=2 * cores).inference_threads == 1
    assert ServeConfig(workers=2, threads=3).inference_threads == 3


def test_warning_when_exposed_without_a_key(monkeypatch):
    monkeypatch.delenv("CATDOG_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert exposure_warning(ServeConfig()) is None
    assert exposure_warning(ServeConfig(host="0.0.0.0", api_key=KEY)) is None
    assert "without an API key" in exposure_warning(ServeConfig(host="0.0.0.0"))
    assert "without an API key" in exposure_warning(ServeConfig(host="my-host.example"))


def test_every_answer_has_a_request_id_that_is_logged(keyed_client, caplog):
    caplog.set_level(logging.INFO, logger="catdog.serve.access")
    generated = [keyed_client.get("/health"), keyed_client.post("/predict"),  # 401
                 keyed_client.get("/missing", headers={"Authorization": f"Bearer {KEY}"})]  # 404
    for response in generated:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert len({r.headers["x-request-id"] for r in generated}) == 3
    echoed = keyed_client.get("/ready", headers={"X-Request-ID": "trace-42.a"})
    assert echoed.headers["x-request-id"] == "trace-42.a"
    replaced = keyed_client.get("/ready", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    log = caplog.text
    for response in [*generated, echoed]:
        assert f"request_id={response.headers['x-request-id']}" in log
    assert re.search(r'"POST /predict HTTP/1.1" 401 [0-9.]+ ms request_id=', log)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


@pytest.mark.slow
def test_two_workers_serve_one_port(model_file, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    environment = {**os.environ, "CATDOG_API_KEY": KEY}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "catdog.cli", "serve", "--model", str(model_file), "--port",
                                    str(port), "--workers", "2"], stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.time() + 120
        while "catdog serve ready" not in log_path.read_text() or log_path.read_text().count("catdog serve ready") < 2:
            assert process.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.3)
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg() + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {KEY}"}
        request_ids = []
        for _ in range(6):
            status, response_headers, payload = request(port, "POST", "/predict", body, headers)
            assert status == 200 and json.loads(payload)["label"] == "dog"
            request_ids.append(response_headers["x-request-id"])
        status, response_headers, _ = request(port, "GET", "/health")
        assert status == 200
        request_ids.append(response_headers["x-request-id"])
        assert request(port, "POST", "/predict", body, {"Content-Type": headers["Content-Type"]})[0] == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    log = log_path.read_text()
    ready_pids = set(re.findall(r"INFO (\d+) catdog\.serve: catdog serve ready", log))
    assert len(ready_pids) == 2, log  # two processes, each with its model
    for request_id in request_ids:
        assert f"request_id={request_id}" in log
