"""Grad-CAM: the command, the exported heatmaps against autograd's Grad-CAM, a frozen backbone (head run),
POST /explain, and that the heatmap finds the cat."""

from __future__ import annotations

import base64
import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_image, make_kaggle_folder
from PIL import Image

from catdog.training.backends import load_torch_predictor
from catdog.cli import main
from catdog.runtime.explain import explain_photo
from catdog.training.export import DeployableNetwork, builtin_model, builtin_model_file, load_exportable, open_run_with_export, write_model_file
from catdog.training.models import (
    IMAGENET_CAT_CLASSES,
    IMAGENET_DOG_CLASSES,
    MODEL_SPECS,
    ImageNetCatDogClassifier,
    SimpleCNNBackbone,
    create_model,
)
from catdog.runtime.predict import Predictor
from catdog.runtime.model_file import load_model_file
from catdog.runtime.runs import RunError, RunMeta
from catdog.training.train import TrainConfig, train

# Cats the zero-training model and a small head run both classify as cats when pasted small on a grey canvas
# (the zero-training model calls many grey-canvas cats a dog: a grey Weimaraner is an ImageNet class).
QUADRANT_CATS = ("cat.1010.jpg", "cat.1013.jpg", "cat.1016.jpg")


@pytest.fixture(scope="module")
def run_dir(served_run):
    """The tiny simple_cnn run (conftest's `served_run`), with its exported model.onnx."""
    return served_run[0]


@pytest.fixture(scope="module")
def model_file(served_run):
    return served_run[1]


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """A head-strategy run (EfficientNet-Lite0, frozen pretrained backbone, linear head on cached features) on the
    generated colour photos, and its exported file."""
    root = tmp_path_factory.mktemp("explain-head")
    with pytest.MonkeyPatch.context() as patch:  # the feature cache stays in this session's cache
        patch.setenv("CATDOG_CACHE", str(tmp_path_factory.getbasetemp() / "catdog-cache"))
        data = make_kaggle_folder(root / "train", per_class=8)
        train(TrainConfig(data=str(data), out=str(root / "run"), preset="fast", strategy="head", flip=False, epochs=10,
                          num_workers=0, progress=False), log=lambda _: None)
        model_file = Path(open_run_with_export(str(root / "run")).source)
    return root / "run", model_file


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
    predictor = load_torch_predictor(str(run_dir), "cpu")  # PyTorch agrees with the exported file the command ran
    for row, source in zip(rows, (photos / "dog.jpg", photos / "more" / "dog.jpg")):
        photo = Image.open(source)
        overlay = Image.open(out / row["overlay"])
        assert overlay.size == photo.size and overlay.mode == "RGB"
        assert not np.array_equal(np.asarray(overlay), np.asarray(photo.convert("RGB")))  # the heatmap is drawn over it
        expected = predictor.predict_pil([photo.convert("RGB")])[0]
        assert [float(row["prob_cat"]), float(row["prob_dog"])] == pytest.approx(expected.tolist(), abs=1e-4)
        assert row["label"] == ("cat", "dog")[int(expected.argmax())]
    assert rows[0]["label"] == "dog" and rows[1]["label"] == "cat"


def test_exported_file_and_torch_twin_explain_alike(run_dir, model_file):
    """The file's heatmaps (ONNX Runtime) and the PyTorch twin's (the same DeployableNetwork) agree."""
    exported, twin = load_model_file(model_file), load_torch_predictor(str(run_dir), "cpu")
    assert exported.has_heatmaps and twin.has_heatmaps
    assert exported.heatmap_offset == pytest.approx(twin.heatmap_offset, abs=1e-6)
    for label, size in ((0, (180, 120)), (1, (97, 203))):
        photo = colour_image(label, 11, size)
        for target in (None, 0, 1):
            ours, theirs = explain_photo(exported, photo, target=target), explain_photo(twin, photo, target=target)
            assert ours.heatmap.shape == (size[1], size[0])
            assert ours.probabilities == pytest.approx(theirs.probabilities, abs=1e-5)
            np.testing.assert_allclose(ours.heatmap, theirs.heatmap, atol=1e-4)
        assert explain_photo(exported, photo).label == ("cat", "dog")[label]


# ---------------------------------------------------------------- the exported maps are Grad-CAM


def autograd_grad_cam(network: DeployableNetwork, images: torch.Tensor, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM as Selvaraju et al. compute it, by autograd: the last convolutional map A, the gradient of the
    target's log-odds (its logit minus the log-sum-exp of the others) with respect to A, channel weights = that
    gradient's spatial mean, map = ReLU(sum_k w_k A_k). Also the logits, from A through the model's own layers."""
    feature_map = network.feature_map(images).detach().requires_grad_(True)
    model = network.model
    if isinstance(model, ImageNetCatDogClassifier):
        log_probabilities = torch.log_softmax(model.imagenet_model.forward_head(feature_map), dim=1)
        # each group's mean class probability (models.ImageNetCatDogClassifier)
        logits = torch.stack([torch.logsumexp(log_probabilities[:, list(IMAGENET_CAT_CLASSES)], dim=1) - math.log(len(IMAGENET_CAT_CLASSES)),
                              torch.logsumexp(log_probabilities[:, list(IMAGENET_DOG_CLASSES)], dim=1) - math.log(len(IMAGENET_DOG_CLASSES))], dim=1)
    elif isinstance(model.backbone, SimpleCNNBackbone):
        logits = model.head(model.backbone.dense(model.backbone.features[8:](feature_map)))
    else:
        logits = model.head(model.backbone.forward_head(feature_map))
    others = [j for j in range(logits.shape[1]) if j != target]
    score = (logits[:, target] - torch.logsumexp(logits[:, others], dim=1)).sum()
    (gradient,) = torch.autograd.grad(score, feature_map)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * feature_map).sum(dim=1)).detach().numpy(), logits.detach().numpy()


def assert_maps_equal_after_normalising(ours: np.ndarray, reference: np.ndarray, scale: np.ndarray, what: str,
                                        tolerance: float) -> int:
    """Each image's map divided by its maximum equals the reference's to `tolerance`; where the reference is empty
    (every position's weighted sum negative, so ReLU leaves nothing), ours is too, to `tolerance` times `scale` (the
    image's largest map over all classes). Returns how many maps were not empty."""
    non_empty = 0
    for index, (mine, theirs) in enumerate(zip(ours, reference)):
        if theirs.max() > 0:
            non_empty += 1
            np.testing.assert_allclose(mine / mine.max(), theirs / theirs.max(), rtol=0, atol=tolerance,
                                       err_msg=f"{what}, image {index}")
        else:
            assert mine.max() <= tolerance * scale[index], f"{what}, image {index}: the reference map is empty, ours is not"
    return non_empty


def check_class_maps_are_grad_cam(network: DeployableNetwork, meta: RunMeta, path) -> None:
    """The exported file's class_maps (ONNX Runtime), and the DeployableNetwork's in torch, against autograd."""
    assert network.has_class_maps and "class_maps" in network.output_names
    size = meta.preprocess.input_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, size, size, generator=generator)
    with torch.no_grad():
        expected_logits = network.model.eval()(images).numpy()
        outputs = {name: output.numpy() for name, output in zip(network.output_names, network(images))}
    torch_logits, torch_maps = outputs["logits"], outputs["class_maps"]
    predictor = load_model_file(path)
    assert predictor.has_heatmaps
    exported = predictor.network.run(images.numpy(), ("logits", "class_maps"))
    assert exported["class_maps"].shape == torch_maps.shape and torch_maps.shape[:2] == (3, len(meta.class_names))
    np.testing.assert_allclose(torch_logits, expected_logits, rtol=0, atol=1e-4)
    assert np.abs(exported["logits"] - expected_logits).max() <= 1e-4
    references = []
    for target in range(len(meta.class_names)):
        reference, logits = autograd_grad_cam(network, images, target)
        np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-4)  # the reference's path is the model's
        references.append(reference)
    references = np.stack(references, axis=1)  # [N, classes, h, w]
    scale = references.reshape(len(images), -1).max(axis=1)  # each image's largest map value over all classes
    assert (scale > 0).all()
    non_empty = 0
    # The graph that is exported (DeployableNetwork in torch) is Grad-CAM to float32 rounding, 1e-5. The file, run
    # by ONNX Runtime (its own convolution kernels and fused batch norms), sums 1280 channels in another order:
    # measured up to 2.3e-5 on EfficientNet-Lite0 after normalising, so it is held to 1e-4, the export's parity
    # tolerance for probabilities.
    for target in range(len(meta.class_names)):
        for what, maps, tolerance in (("in torch", torch_maps, 1e-5), ("exported", exported["class_maps"], 1e-4)):
            non_empty += assert_maps_equal_after_normalising(maps[:, target], references[:, target], scale,
                                                             f"{meta.model_name} {what}, class {target}", tolerance)
    assert non_empty >= len(images) * len(meta.class_names)  # at least half the maps say something


def test_class_maps_are_grad_cam_simple_cnn(run_dir, model_file, tmp_path):
    network, meta = load_exportable(str(run_dir))  # trained: two classes, 32 px
    check_class_maps_are_grad_cam(network, meta, model_file)
    torch.manual_seed(0)  # untrained, three classes (the log-odds weigh the other classes by softmax), 224 px
    meta = RunMeta("simple_cnn", ["cat", "dog", "fox"], MODEL_SPECS["simple_cnn"].preprocess, 1.0, "finetune")
    network = DeployableNetwork(create_model("simple_cnn", 3))
    write_model_file(network, meta, tmp_path / "model.onnx")
    check_class_maps_are_grad_cam(network, meta, tmp_path / "model.onnx")


@pytest.mark.slow
def test_class_maps_are_grad_cam_efficientnet_lite0(head_run):
    run, model_file = head_run
    network, meta = load_exportable(str(run))
    assert meta.model_name == "efficientnet_lite0" and type(network.model.backbone).__name__ == "EfficientNet"
    check_class_maps_are_grad_cam(network, meta, model_file)


@pytest.mark.slow
def test_class_maps_are_grad_cam_builtin_model():
    model, meta = builtin_model()
    check_class_maps_are_grad_cam(DeployableNetwork(model), meta, builtin_model_file())


# ---------------------------------------------------------------- a frozen backbone


@pytest.mark.slow
def test_head_run_with_a_frozen_backbone_has_heatmaps(head_run):
    """The known pitfall of autograd Grad-CAM: a head run's backbone has requires_grad=False, so nothing would flow
    back to its maps. The exported maps are closed-form, so the run's file has them all the same."""
    run, model_file = head_run
    meta = load_exportable(str(run))[1]
    assert meta.strategy == "head" and meta.model_name == "efficientnet_lite0"
    predictor = load_model_file(model_file)
    assert predictor.has_heatmaps and predictor.meta.strategy == "head"
    for label in (0, 1):
        photo = colour_image(label, 1, (300, 200))
        explanation = explain_photo(predictor, photo)
        assert explanation.label == ("cat", "dog")[label]
        assert explanation.heatmap.shape == (200, 300) and explanation.heatmap.max() == pytest.approx(1.0)
        assert (explanation.heatmap > 0.1).mean() > 0.01  # not a single hot pixel
        assert explanation.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_frozen_simple_cnn_still_gets_a_heatmap(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn", 2, freeze_backbone=True)
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())
    meta = RunMeta("simple_cnn", ["cat", "dog"], MODEL_SPECS["simple_cnn"].preprocess, 1.0, "head", tta=True)
    write_model_file(DeployableNetwork(model), meta, tmp_path / "model.onnx")
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())  # the model is left as it was
    explanation = explain_photo(load_model_file(tmp_path / "model.onnx"), colour_image(0, 1, (300, 200)), target=0)
    assert explanation.heatmap.shape == (200, 300) and explanation.heatmap.max() == pytest.approx(1.0)
    assert explanation.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_file_without_heatmaps_says_so(model_file):
    predictor = load_model_file(model_file)
    without = Predictor(LogitsOnly(predictor.network), predictor.meta, predictor.heatmap_offset, "logits-only.onnx")
    assert not without.has_heatmaps
    with pytest.raises(RunError, match="no heatmaps"):
        explain_photo(without, colour_image(0, 1, (60, 40)))


class LogitsOnly:
    """A network like a transformer's export: logits and features, no class_maps."""

    backend = "onnxruntime"
    outputs = ("logits", "features")

    def __init__(self, network):
        self.network = network

    def run(self, images, outputs=("logits",)):
        assert "class_maps" not in outputs
        return self.network.run(images, outputs)


# ---------------------------------------------------------------- the heatmap finds the cat


def quadrant_canvas(photo: Image.Image, quadrant: int, side: int = 448) -> Image.Image:
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    half = side // 2
    canvas.paste(photo.resize((half, half)), ((quadrant % 2) * half, (quadrant // 2) * half))
    return canvas


def quadrant_shares(predictor: Predictor, photo: Image.Image) -> list[float]:
    """For each quadrant the cat is pasted into: the share of the cat-labelled heatmap's mass in that quadrant."""
    shares = []
    for quadrant in range(4):
        explanation = explain_photo(predictor, quadrant_canvas(photo, quadrant))
        assert explanation.label == "cat"
        heatmap = explanation.heatmap
        half = heatmap.shape[0] // 2
        rows = slice(0, half) if quadrant < 2 else slice(half, None)
        columns = slice(0, half) if quadrant % 2 == 0 else slice(half, None)
        shares.append(float(heatmap[rows, columns].sum() / heatmap.sum()))
    return shares


@pytest.mark.slow
def test_heatmap_finds_the_cat_zero_training_model(shared_data):
    predictor = load_model_file(builtin_model_file())
    assert predictor.is_zero_training and predictor.has_heatmaps
    for name in QUADRANT_CATS:
        shares = quadrant_shares(predictor, Image.open(shared_data / "train" / name).convert("RGB"))
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
    predictor = open_run_with_export(str(tmp_path / "run"))
    assert predictor.meta.strategy == "head"
    for name in QUADRANT_CATS:
        shares = quadrant_shares(predictor, Image.open(shared_data / "train" / name).convert("RGB"))
        assert min(shares) >= 0.6, f"{name}: heatmap share in the cat's quadrant {shares}"


# ---------------------------------------------------------------- POST /explain


@pytest.fixture(scope="module")
def client(model_file):
    from fastapi.testclient import TestClient

    from catdog.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(model=str(model_file), max_upload_mb=1.0, max_pixels=4_000_000))
    with TestClient(app) as test_client:
        yield test_client


def jpeg(label: int, size=(200, 150)) -> bytes:
    buffer = io.BytesIO()
    colour_image(label, 7, size).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_explain_endpoint_answers_prediction_and_overlay(client, model_file):
    answer = client.post("/explain", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")})
    assert answer.status_code == 200
    body = answer.json()
    predicted = client.post("/predict", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")}).json()
    assert body["label"] == predicted["label"] == "dog"
    assert body["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-4)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (200, 150)
    # the overlay is the exported file's Grad-CAM of the predicted class, as `explain_photo` draws it
    photo = Image.open(io.BytesIO(jpeg(1))).convert("RGB")
    expected = explain_photo(load_model_file(model_file), photo).overlay()
    assert np.abs(np.asarray(overlay.convert("RGB"), dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    raw = client.post("/explain", content=jpeg(0), headers={"content-type": "image/jpeg"}).json()
    assert raw["label"] == "cat"
    assert 'route="/explain",status="200"' in client.get("/metrics").text
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/explain"]["post"]
    assert {"413", "415", "422", "501", "503"} <= set(operation["responses"])
    assert "overlay_png" in schema["components"]["schemas"]["Explanation"]["properties"]


def test_explain_endpoint_answers_501_without_heatmaps(model_file):
    from fastapi.testclient import TestClient

    from catdog.serve.app import ServeConfig, create_app

    exported = load_model_file(model_file)
    predictor = Predictor(LogitsOnly(exported.network), exported.meta, exported.heatmap_offset, "logits-only.onnx")
    with TestClient(create_app(ServeConfig(), predictor=predictor)) as client:
        refused = client.post("/explain", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")})
        assert refused.status_code == 501 and refused.json()["error"] == "no heatmaps"
        assert "logits-only.onnx" in refused.json()["detail"]
        assert client.post("/predict", files={"file": ("dog.jpg", jpeg(1), "image/jpeg")}).json()["label"] == "dog"


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


def test_python_api_explains_like_the_command(run_dir, model_file):
    import catdog

    # the run's exported file (ONNX Runtime on a CPU), the PyTorch twin, and the file on its own
    for model in (catdog.load(run_dir, device="cpu"), catdog.load(run_dir, backend="torch", device="cpu"),
                  catdog.load(model=model_file)):
        photo = colour_image(0, 9, (180, 120))
        explanation = model.explain(photo)
        (prediction,) = model.predict(photo)
        assert explanation.label == prediction.label == "cat"
        assert explanation.confidence == pytest.approx(prediction.confidence, abs=1e-4)
        assert explanation.heatmap.shape == (120, 180)
        assert Image.open(io.BytesIO(explanation._repr_png_())).size == (180, 120)  # a notebook shows the overlay
