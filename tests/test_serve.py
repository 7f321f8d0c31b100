"""The web service through TestClient: each endpoint, each error class, the batch endpoint, overload."""

from __future__ import annotations

import asyncio
import io

import pytest
from conftest import colour_image
from fastapi.testclient import TestClient
from PIL import Image

from catdog.runtime.model_file import load_model_file
from catdog.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def model_file(served_run):
    """The tiny run's exported model.onnx (conftest's `served_run`): what the service runs."""
    return served_run[1]


@pytest.fixture(scope="module")
def client(model_file):
    app = create_app(ServeConfig(model=str(model_file), max_upload_mb=1.0, max_pixels=4_000_000))
    with TestClient(app) as test_client:
        yield test_client


def jpeg(label=1, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    colour_image(label, 7, size).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_health_ready_and_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["classes"] == ["cat", "dog"] and ready["zero_training"] is False
    page = client.get("/")
    assert page.status_code == 200 and "Drop a photo" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    assert client.get("/docs").status_code == 200 and "/predict" in client.get("/openapi.json").text


def test_predict_multipart_and_raw_body(client, model_file):
    answer = client.post("/predict", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")}).json()
    assert answer["label"] == "dog" and set(answer["probabilities"]) == {"cat", "dog"}
    assert answer["confidence"] == max(answer["probabilities"].values())
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["model"] == "simple_cnn" and answer["timing_ms"]["total"] > 0
    raw = client.post("/predict", content=jpeg(0), headers={"content-type": "image/jpeg"}).json()
    assert raw["label"] == "cat"
    # the service answers what the exported file itself says (decoded the same way, same calibration)
    expected = load_model_file(model_file).predict_pil([Image.open(io.BytesIO(jpeg(1))).convert("RGB")])[0]
    assert [answer["probabilities"][name] for name in ("cat", "dog")] == pytest.approx(expected.tolist(), abs=1e-5)


def test_an_app_needs_an_exported_file_or_a_predictor(model_file):
    with pytest.raises(ValueError, match="exported model file"):
        create_app(ServeConfig())
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(model=str(model_file), run="some-run")
    predictor = load_model_file(model_file)
    app = create_app(ServeConfig(), predictor=predictor)  # a predictor given: no file is loaded
    with TestClient(app) as client:
        assert app.state.service.predictor is predictor
        assert client.post("/predict", content=jpeg(1), headers={"content-type": "image/jpeg"}).json()["label"] == "dog"


@pytest.mark.parametrize(
    "payload, status, error",
    [
        (b"<html>hello</html>", 415, "not an image or unsupported format"),
        (b"", 422, "empty file"),
        (jpeg()[:200], 422, None),  # truncated
    ],
)
def test_bad_uploads_get_json_errors(client, payload, status, error):
    response = client.post("/predict", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "detail"}
    if error:
        assert body["error"] == error


def test_size_and_pixel_limits(client):
    too_big = b"\xff\xd8" + b"\x00" * (1024 * 1024 + 10)
    assert client.post("/predict", files={"file": ("big.jpg", too_big, "image/jpeg")}).status_code == 413
    assert client.post("/predict", content=too_big, headers={"content-type": "image/jpeg"}).status_code == 413
    from test_images import png_claiming

    bomb = client.post("/predict", files={"file": ("bomb.png", png_claiming(50_000, 50_000), "image/png")})
    assert bomb.status_code == 413 and bomb.json()["error"] == "too many pixels"


def test_missing_or_wrong_field(client):
    wrong_name = client.post("/predict", files={"image": ("x.jpg", jpeg(), "image/jpeg")})
    assert wrong_name.status_code == 422 and wrong_name.json()["error"] == "missing file"
    text_field = client.post("/predict", data={"file": "not a file"})
    assert text_field.status_code == 422
    assert client.post("/predict").status_code == 422


def test_batch_keeps_order_and_reports_the_bad_file(client):
    files = [("files", ("a.jpg", jpeg(0), "image/jpeg")), ("files", ("b.txt", b"nope", "text/plain")),
             ("files", ("c.jpg", jpeg(1), "image/jpeg"))]
    answer = client.post("/predict/batch", files=files).json()
    assert answer["count"] == 3 and answer["failed"] == 1
    first, second, third = answer["results"]
    assert (first["file"], first["label"]) == ("a.jpg", "cat")
    assert second["file"] == "b.txt" and second["status"] == 415
    assert (third["file"], third["label"]) == ("c.jpg", "dog")


def test_metrics_are_prometheus_text(client):
    client.post("/predict", files={"file": ("x.jpg", jpeg(), "image/jpeg")})
    text = client.get("/metrics").text
    for name in ("catdog_requests_total", "catdog_request_seconds_bucket", "catdog_batch_size_bucket", "catdog_queue_depth"):
        assert name in text
    assert 'route="/predict",status="200"' in text


def test_concurrent_requests_are_batched(model_file):
    app = create_app(ServeConfig(model=str(model_file), max_batch_size=8, max_wait_ms=50))
    with TestClient(app) as client:
        service = app.state.service

        async def many():
            tensors = [service.predictor.transform(colour_image(i % 2, i)) for i in range(8)]
            return await asyncio.gather(*(service.batcher.submit(t) for t in tensors))

        results = client.portal.call(many)
        assert len(results) == 8
        assert "catdog_batch_size_bucket{le=\"8.0\"}" in client.get("/metrics").text
        samples = {s.name: s.value for m in service.metrics.registry.collect() for s in m.samples}
        assert samples["catdog_batch_size_count"] <= 3  # warm-up plus at most two batches for eight images


def test_full_queue_answers_503_with_retry_after(model_file):
    import threading
    import time

    release = threading.Event()
    app = create_app(ServeConfig(model=str(model_file), max_batch_size=1, max_queue=1, max_wait_ms=0))
    with TestClient(app) as client:
        batcher = app.state.service.batcher
        original = batcher.predict_batch
        batcher.predict_batch = lambda images: (release.wait(20), original(images))[1]
        responses = []

        def post():
            responses.append(client.post("/predict", files={"file": ("x.jpg", jpeg(), "image/jpeg")}))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # one in inference, one queued, the rest find the queue full
        release.set()
        for thread in threads:
            thread.join(30)
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and 503 in statuses, statuses
        overloaded = next(r for r in responses if r.status_code == 503)
        assert overloaded.headers["retry-after"] == "1" and overloaded.json()["error"] == "overloaded"


def test_not_ready_answers_503(model_file):
    app = create_app(ServeConfig(model=str(model_file)))
    with TestClient(app) as client:
        app.state.service.ready = False
        assert client.get("/ready").status_code == 503
        refused = client.post("/predict", files={"file": ("x.jpg", jpeg(), "image/jpeg")})
        assert refused.status_code == 503 and refused.headers["retry-after"]


def test_zero_training_model_is_labelled(shared_data):
    from catdog.training.export import builtin_model_file

    app = create_app(ServeConfig(model=str(builtin_model_file())))  # the built-in model, exported once
    with TestClient(app) as client:
        assert client.get("/ready").json()["zero_training"] is True
        photo = (shared_data / "train" / "dog.1001.jpg").read_bytes()
        answer = client.post("/predict", files={"file": ("dog.jpg", photo, "image/jpeg")}).json()
        assert answer["zero_training"] is True and answer["label"] == "dog"


def test_a_batch_over_the_file_limit_is_refused_as_the_schema_says(model_file):
    app = create_app(ServeConfig(model=str(model_file), max_batch_files=2))
    batch = app.openapi()["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert batch["schema"]["properties"]["files"]["maxItems"] == 2
    with TestClient(app) as client:
        photos = [("files", (f"{i}.jpg", jpeg(i % 2), "image/jpeg")) for i in range(3)]
        answer = client.post("/predict/batch", files=photos)
        assert answer.status_code == 422 and answer.json()["error"] == "too many files", answer.text
        assert client.post("/predict/batch", files=photos[:2]).status_code == 200
