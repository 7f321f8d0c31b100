"""The service against its own OpenAPI schema: a property-based fuzz run (schemathesis) with every standard check.

Positive cases (requests the schema allows) must be answered as documented and accepted; negative cases (requests
the schema forbids) must be rejected with a documented 4xx; no case may cause a server error, an undocumented
status or content type, or a body that does not match its schema. The server has an API key, so the checks also
cover the 401s (schemathesis retries requests without and with a wrong key). The schema says an upload is a
binary image; the fuzzer's binary strings are real images here (tiny JPEGs and PNGs), so "valid requests must
be accepted" is a meaningful check for the prediction endpoints.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import schemathesis
from conftest import colour_image
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.transport.serialization import Binary

from catdog.serve.app import ServeConfig, create_app

API_KEY = "contract-test-key"
AUTHORIZATION = {"Authorization": f"Bearer {API_KEY}"}
CONFIG_FILE = Path(__file__).resolve().parents[1] / "schemathesis.toml"


def encoded_image(label: int, seed: int, width: int, height: int, image_format: str) -> bytes:
    buffer = io.BytesIO()
    colour_image(label, seed, (width, height)).save(buffer, format=image_format)
    return buffer.getvalue()


IMAGES = st.builds(encoded_image, st.integers(0, 1), st.integers(0, 10_000), st.integers(1, 48), st.integers(1, 48),
                   st.sampled_from(["JPEG", "PNG"]))


# The schema comes from the app's configuration alone (the model file is only loaded when the app starts), so it is
# read at collection time; the app the fuzzer calls gets its model from the fixture below. (schemathesis.pytest.from_fixture would defer both,
# but does not work with pytest 9.)
class AppUnderTest:
    app = None

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


APP_UNDER_TEST = AppUnderTest()
# The fuzzer's binary strings become real images (a process-wide registry; no other test module uses schemathesis).
schemathesis.openapi.format("binary", IMAGES.map(Binary))
schemathesis.openapi.media_type("image/jpeg", IMAGES)
schemathesis.openapi.media_type("image/png", IMAGES)
NOT_LOADED = "never-loaded.onnx"  # create_app needs a model file; openapi() does not open it
schema = schemathesis.openapi.from_dict(create_app(ServeConfig(model=NOT_LOADED, api_key=API_KEY)).openapi(),
                                        config=SchemathesisConfig.from_path(CONFIG_FILE))
schema.app = APP_UNDER_TEST


@pytest.fixture(scope="module")
def served_app(served_run):
    APP_UNDER_TEST.app = create_app(ServeConfig(model=str(served_run[1]), api_key=API_KEY))  # the exported model.onnx
    return APP_UNDER_TEST


@pytest.mark.slow
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_keeps_its_contract(case, served_app):
    case.call_and_validate(headers=AUTHORIZATION)


def test_the_schema_is_typed_versioned_and_names_its_operations(monkeypatch):
    import catdog

    monkeypatch.delenv("CATDOG_API_KEY", raising=False)
    openapi = create_app(ServeConfig(model=NOT_LOADED)).openapi()
    assert openapi["info"]["version"] == catdog.__version__
    operations = {path: next(iter(methods.values())) for path, methods in openapi["paths"].items()}
    assert {path: operation["operationId"] for path, operation in operations.items()} == {
        "/predict": "predict", "/predict/batch": "predict_batch", "/explain": "explain", "/health": "health",
        "/ready": "ready", "/metrics": "metrics"}
    for path, model in [("/predict", "Prediction"), ("/predict/batch", "BatchResult"), ("/explain", "Explanation")]:
        responses = operations[path]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        # no 401: this server has no key; /explain also documents 501, a served file without heatmaps
        errors = {"413", "415", "422", "503"} | ({"501"} if path == "/explain" else set())
        assert set(responses) == {"200"} | errors
        for status in errors:
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    for path in ("/predict", "/explain"):  # an upload is a non-empty image, whichever way it is sent
        content = operations[path]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "image/jpeg", "image/png"}
        for image in (content["multipart/form-data"]["schema"]["properties"]["file"], content["image/jpeg"]["schema"],
                      content["image/png"]["schema"]):
            assert (image["type"], image["format"], image["minLength"]) == ("string", "binary", 1)
    batch_body = operations["/predict/batch"]["requestBody"]
    assert batch_body["required"] is True
    batch_form = batch_body["content"]["multipart/form-data"]["schema"]
    assert batch_form["required"] == ["files"] and batch_form["properties"]["files"]["minItems"] == 1
    # one result or one error per file: an empty file is a valid batch item, answered by its own 422 in a 200
    assert batch_form["properties"]["files"]["items"] == {"type": "string", "format": "binary",
                                                          "description": batch_form["properties"]["files"]["items"]["description"]}
    assert set(operations["/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    assert openapi["components"]["schemas"]["ErrorBody"]["required"] == ["error", "detail"]


@pytest.mark.slow
def test_the_stock_schemathesis_cli_finds_nothing_against_a_live_server(served_run, tmp_path):
    """`schemathesis run --checks all` (the command line a user would run, with the project's schemathesis.toml)
    against `catdog serve --model FILE` on a free loopback port: no failure, exit status 0. Its binary strings are
    arbitrary bytes, not images, so this also checks how the real server answers uploads that are not images."""
    import os
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    from test_browser import free_port

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "catdog.cli", "serve", "--model", str(served_run[1]), "--port", str(port)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "CATDOG_API_KEY": API_KEY})
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, f"catdog serve did not start:\n{log_path.read_text()}"
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        schemathesis_command = Path(sys.executable).with_name("schemathesis")
        try:
            result = subprocess.run(
                [str(schemathesis_command), "--config-file", str(CONFIG_FILE), "--no-color", "run", "--checks", "all",
                 "--max-examples", "20", "--workers", "1", "--request-timeout", "30", "--generation-database", "none",
                 "--header", f"Authorization: Bearer {API_KEY}", f"http://127.0.0.1:{port}/openapi.json"],
                cwd=tmp_path, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"schemathesis ran over 600 s:\n{expired.stdout}")
        assert result.returncode == 0, f"schemathesis found problems:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
        selected, total = map(int, re.search(r"Selected:\s*(\d+)/(\d+)", result.stdout).groups())
        tested = int(re.search(r"Tested:\s*(\d+)", result.stdout).group(1))
        assert tested == selected == total >= 6, result.stdout  # every operation was exercised
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
