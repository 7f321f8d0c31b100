"""Grad-CAM: the command, the frozen-backbone pitfall, POST /explain, and that the heatmap finds the cat."""

from __future__ import annotations

import base64
import csv
import io

import numpy as np
import pytest
from conftest import colour_image, make_kaggle_folder
from PIL import Image

from catdog.runs import RunMeta
from catdog.cli import main
from catdog.explain import GradCamExplainer, load_explainer
from catdog.models import MODEL_SPECS, create_model
from catdog.predict import load_predictor
from catdog.train import TrainConfig, train

# Cats the zero-training model and a small head run both classify as cats when pasted small on a grey canvas
# (the zero-training model calls many grey-canvas cats a dog: a grey Weimaraner is an ImageNet class).
QUADRANT_CATS = ("cat.1010.jpg", "cat.1013.jpg", "cat.1016.jpg")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_kaggle_folder(root / "train", per_class=12)
    train(TrainConfig(data=str(data), out=str(root / "run"), model="simple_cnn", strategy="finetune", epochs=3,
                      batch_size=8, lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0),
          log=lambda _: None)
    return root / "run"


def test_explain_command_writes_overlays_and_probabilities(run_dir, tmp_path):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    colour_image(1, 5, (320, 240)).save(photos / "dog.jpg")
    colour_image(0, 6, (150, 260)).save(photos / "more" / "dog.jpg")  # same stem, other folder: its own overlay
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = main(["explain", "--run", str(run_dir), str(photos / "dog.jpg"), str(photos / "more"), str(photos / "broken.jpg"),
                 "--output", str(out)])
    assert code == 3  # one unreadable file: the others are still explained
    with open(out / "explanations.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["overlay"] for row in rows] == ["dog.gradcam.png", "dog-2.gradcam.png"]
    predictor = load_predictor(str(run_dir), backend="torch", device="cpu")
    for row, source in zip(rows, (photos / "dog.jpg", photos / "more" / "dog.jpg")):
        photo = Image.open(source)
        overlay = Image.open(out / row["overlay"])
        assert overlay.size == photo.size and overlay.mode == "RGB"
        assert not np.array_equal(np.asarray(overlay), np.asarray(photo.convert("RGB")))  # the heatmap is drawn over it
        expected = predictor.predict_pil([photo.convert("RGB")])[0]
        assert [float(row["prob_cat"]), float(row["prob_dog"])] == pytest.approx(expected.tolist(), abs=1e-4)
        assert row["label"] == ("cat", "dog")[int(expected.argmax())]
    assert rows[0]["label"] == "dog" and rows[1]["label"] == "cat"


def test_frozen_backbone_still_gets_a_heatmap():
    """The known pitfall: a head run's backbone has requires_grad=False, so nothing would flow back to its maps."""
    model = create_model("simple_cnn", 2, freeze_backbone=True)
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())
    meta = RunMeta("simple_cnn", ["cat", "dog"], MODEL_SPECS["simple_cnn"].preprocess, 1.0, "head", tta=True)
    explanation = GradCamExplainer(model, meta).explain(colour_image(0, 1, (300, 200)), target=0)
    assert explanation.heatmap.shape == (200, 300) and explanation.heatmap.max() == pytest.approx(1.0)
    assert explanation.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())  # the model is left as it was


def quadrant_canvas(photo: Image.Image, quadrant: int, side: int = 448) -> Image.Image:
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    half = side // 2
    canvas.paste(photo.resize((half, half)), ((quadrant % 2) * half, (quadrant // 2) * half))
    return canvas


def quadrant_shares(explainer, photo: Image.Image) -> list[float]:
    """For each quadrant the cat is pasted into: the share of the cat-labelled heatmap's mass in that quadrant."""
    shares = []
    for quadrant in range(4):
        explanation = explainer.explain(quadrant_canvas(photo, quadrant))
        assert explanation.label == "cat"
        heatmap = explanation.heatmap
        half = heatmap.shape[0] // 2
        rows = slice(0, half) if quadrant < 2 else slice(half, None)
        columns = slice(0, half) if quadrant % 2 == 0 else slice(half, None)
        shares.append(float(heatmap[rows, columns].sum() / heatmap.sum()))
    return shares


@pytest.mark.slow
def test_heatmap_finds_the_cat_zero_training_model(shared_data):
    explainer = load_explainer("", device="cpu")
    for name in QUADRANT_CATS:
        shares = quadrant_shares(explainer, Image.open(shared_data / "train" / name).convert("RGB"))
        assert min(shares) >= 0.6, f"{name}: heatmap share in the cat's quadrant {shares}"


@pytest.mark.slow
def test_heatmap_finds_the_cat_trained_run(shared_data, tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    for kind in ("cat", "dog"):  # 20 photos of each class, none of them the test cats
        for number in range(2001, 2021):
            (data / f"{kind}.{number}.jpg").symlink_to(shared_data / "train" / f"{kind}.{number}.jpg")
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), preset="fast", flip=False, num_workers=0, progress=False),
          log=lambda _: None)
    explainer = load_explainer(str(tmp_path / "run"), device="cpu")
    assert explainer.meta.strategy == "head"
    for name in QUADRANT_CATS:
        shares = quadrant_shares(explainer, Image.open(shared_data / "train" / name).convert("RGB"))
        assert min(shares) >= 0.6, f"{name}: heatmap share in the cat's quadrant {shares}"


# ---------------------------------------------------------------- POST /explain


@pytest.fixture(scope="module")
def client(run_dir):
    from fastapi.testclient import TestClient

    from catdog.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(run=str(run_dir), backend="torch", max_upload_mb=1.0, max_pixels=4_000_000))
    with TestClient(app) as test_client:
        yield test_client


def jpeg(label: int, size=(200, 150)) -> bytes:
    buffer = io.BytesIO()
    colour_image(label, 7, size).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_explain_endpoint_answers_prediction_and_overlay(client):
    answer = client.post("/explain", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")})
    assert answer.status_code == 200
    body = answer.json()
    predicted = client.post("/predict", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")}).json()
    assert body["label"] == predicted["label"] == "dog"
    assert body["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-4)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (200, 150)
    raw = client.post("/explain", content=jpeg(0), headers={"content-type": "image/jpeg"}).json()
    assert raw["label"] == "cat"
    assert 'route="/explain",status="200"' in client.get("/metrics").text
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/explain"]["post"]
    assert {"413", "415", "422", "503"} <= set(operation["responses"])
    assert "overlay_png" in schema["components"]["schemas"]["Explanation"]["properties"]


@pytest.mark.parametrize("files, content", [
    ({"file": ("x.jpg", b"<html>hello</html>", "image/jpeg")}, None),
    ({"file": ("x.jpg", b"", "image/jpeg")}, None),
    ({"file": ("x.jpg", jpeg(1)[:200], "image/jpeg")}, None),
    ({"image": ("x.jpg", jpeg(1), "image/jpeg")}, None),
    ({"file": ("big.jpg", b"\xff\xd8" + b"\x00" * (1024 * 1024 + 10), "image/jpeg")}, None),
    (None, b""),
])
def test_bad_inputs_get_the_same_answer_as_predict(client, files, content):
    explained = client.post("/explain", files=files, content=content)
    predicted = client.post("/predict", files=files, content=content)
    assert explained.status_code == predicted.status_code and 400 <= explained.status_code < 500
    assert explained.json()["error"] == predicted.json()["error"]


def test_python_api_explains_like_the_command(run_dir, tmp_path):
    import catdog

    model = catdog.load(run_dir, backend="torch")
    photo = colour_image(0, 9, (180, 120))
    explanation = model.explain(photo)
    (prediction,) = model.predict(photo)
    assert explanation.label == prediction.label == "cat"
    assert explanation.confidence == pytest.approx(prediction.confidence, abs=1e-4)
    assert explanation.heatmap.shape == (120, 180)
    assert Image.open(io.BytesIO(explanation._repr_png_())).size == (180, 120)  # a notebook shows the overlay
