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
from conftest import colour_image, make_kaggle_folder
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.transport.serialization import Binary

from catdog.serve.app import ServeConfig, create_app
from catdog.train import TrainConfig, train

API_KEY = "contract-test-key"
AUTHORIZATION = {"Authorization": f"Bearer {API_KEY}"}
CONFIG_FILE = Path(__file__).resolve().parents[1] / "schemathesis.toml"


def encoded_image(label: int, seed: int, width: int, height: int, image_format: str) -> bytes:
    buffer = io.BytesIO()
    colour_image(label, seed, (width, height)).save(buffer, format=image_format)
    return buffer.getvalue()


IMAGES = st.builds(encoded_image, st.integers(0, 1), st.integers(0, 10_000), st.integers(1, 48), st.integers(1, 48),
                   st.sampled_from(["JPEG", "PNG"]))


# The schema comes from the app's configuration alone (no model needed), so it is read at collection time; the
# app the fuzzer calls gets its model from the fixture below. (schemathesis.pytest.from_fixture would defer both,
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
schema = schemathesis.openapi.from_dict(create_app(ServeConfig(api_key=API_KEY)).openapi(),
                                        config=SchemathesisConfig.from_path(CONFIG_FILE))
schema.app = APP_UNDER_TEST


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    data = make_kaggle_folder(root / "train", per_class=4)
    train(TrainConfig(data=str(data), out=str(root / "run"), model="simple_cnn", strategy="finetune", epochs=1,
                      batch_size=8, image_size=32, num_workers=0, progress=False), log=lambda _: None)
    APP_UNDER_TEST.app = create_app(ServeConfig(run=str(root / "run"), backend="torch", api_key=API_KEY))
    return APP_UNDER_TEST


@pytest.mark.slow
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_keeps_its_contract(case, served_app):
    case.call_and_validate(headers=AUTHORIZATION)


def test_the_schema_is_typed_versioned_and_names_its_operations(monkeypatch):
    import catdog

    monkeypatch.delenv("CATDOG_API_KEY", raising=False)
    openapi = create_app(ServeConfig()).openapi()
    assert openapi["info"]["version"] == catdog.__version__
    operations = {path: next(iter(methods.values())) for path, methods in openapi["paths"].items()}
    assert {path: operation["operationId"] for path, operation in operations.items()} == {
        "/predict": "predict", "/predict/batch": "predict_batch", "/explain": "explain", "/health": "health",
        "/ready": "ready", "/metrics": "metrics"}
    for path, model in [("/predict", "Prediction"), ("/predict/batch", "BatchResult"), ("/explain", "Explanation")]:
        responses = operations[path]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert set(responses) == {"200", "413", "415", "422", "503"}  # no 401: this server has no key
        for status in ("413", "415", "422", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    batch_body = operations["/predict/batch"]["requestBody"]
    assert batch_body["required"] is True
    batch_form = batch_body["content"]["multipart/form-data"]["schema"]
    assert batch_form["required"] == ["files"] and batch_form["properties"]["files"]["minItems"] == 1
    assert set(operations["/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    assert openapi["components"]["schemas"]["ErrorBody"]["required"] == ["error", "detail"]
