"""Taught examples of "neither" (`catdog train --neither DIR`) and several data sources (`--data A --data B`): the
options, a taught photo refused end to end (the run, its exported file alone in a plain ONNX Runtime session, predict
--model, serve's JSON, evaluate), and a run without --neither exactly as before."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from conftest import colour_image, make_class_folders, make_kaggle_folder
from fastapi.testclient import TestClient
from PIL import Image

from catdog.cli import build_parser, main
from catdog.runtime.options import config_from_arguments
from catdog.runtime.predict import Decision
from catdog.runtime.probabilities import REFUSED_TAUGHT, REFUSED_UNLIKE, taught_refusals
from catdog.runtime.model_file import load_model_file
from catdog.runtime.runs import NEITHER_FILE, read_meta
from catdog.serve.app import ServeConfig, create_app
from catdog.training.config import TrainConfig
from catdog.training.evaluate import EvaluateConfig, evaluate_run
from catdog.training.export import ExportConfig, load_exportable, run_export
from catdog.training.neither import find_neither_photos, held_out_mask
from catdog.training.train import DUPLICATES_FILE, train

BLUE = 2  # colour_image's third colour: neither the cats' (red) nor the dogs' (green)


def quiet(_message: str) -> None:
    pass


def parsed_train_config(argv: list[str]) -> TrainConfig:
    arguments = build_parser(["train"] + argv).parse_args(["train"] + argv)
    return config_from_arguments(TrainConfig, arguments, arguments.config)


def test_data_and_neither_are_repeatable_and_an_old_single_data_string_still_works(tmp_path):
    config = parsed_train_config(["--data", "a", "--data", "b", "c", "--neither", "x", "--neither", "y"])
    assert config.data == ["a", "b", "c"] and config.neither == ["x", "y"]
    assert parsed_train_config(["--data", "a"]).neither == []
    old = tmp_path / "old.yaml"
    old.write_text("data: ../shared/data/dogs-vs-cats/train\nepochs: 3\n")  # catdog <= 0.6 wrote one string
    config = parsed_train_config(["--config", str(old)])
    assert config.data == ["../shared/data/dogs-vs-cats/train"] and config.epochs == 3
    assert TrainConfig(data="one").data == ["one"]
    with pytest.raises(ValueError, match="neither_keep"):
        TrainConfig(data="one", neither_keep=0.0)


def blue_photos(folder: Path, count: int, seed: int = 5000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"blue{index}.jpg"
        colour_image(BLUE, seed + index).save(path)
        paths.append(path)
    return paths


def test_taught_examples_are_found_once_and_never_a_training_photo(tmp_path):
    kaggle = make_kaggle_folder(tmp_path / "train", per_class=3)
    blue_photos(tmp_path / "others" / "sky", 4)
    (tmp_path / "others" / "sky" / "copy.jpg").write_bytes((tmp_path / "others" / "sky" / "blue0.jpg").read_bytes())
    (tmp_path / "others" / "a-cat.jpg").write_bytes((kaggle / "cat.0.jpg").read_bytes())  # labelled: not "neither"
    blue_photos(tmp_path / "more", 2, seed=7000)
    found = find_neither_photos([str(tmp_path / "others"), str(tmp_path / "more")], list(kaggle.glob("*.jpg")))
    assert len(found) == 6 and found.duplicates == 1 and found.training_photos == 1
    assert found.names[:2] == ["others/sky/blue0.jpg", "others/sky/blue1.jpg"] and found.names[-1] == "more/blue1.jpg"
    held = held_out_mask(found.digests, seed=42)
    assert held.tolist() == held_out_mask(list(reversed(found.digests)), seed=42)[::-1].tolist()  # by content, not order


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> dict:
    """A head run on two sources (Kaggle names + class folders, one photo in both) taught 12 blue photos as
    "neither", its export, and photos to predict: a taught example itself, new blue photos, new pets."""
    root = tmp_path_factory.mktemp("neither")
    kaggle = make_kaggle_folder(root / "train", per_class=10)
    later = make_class_folders(root / "later", per_class=3, classes=("cat", "dog"))
    (later / "dog" / "copy.jpg").write_bytes((kaggle / "dog.3.jpg").read_bytes())
    examples = blue_photos(root / "not-pets" / "blue", 12)
    config = TrainConfig(data=[str(kaggle), str(later)], neither=[str(root / "not-pets")], out=str(root / "run"),
                         model="efficientnet_lite0", strategy="head", epochs=8, num_workers=0, progress=False,
                         image_size=64, val_fraction=0.3)
    log: list[str] = []
    result = train(config, log=log.append)
    inbox = root / "inbox"
    inbox.mkdir()
    (inbox / "taught.jpg").write_bytes(examples[5].read_bytes())
    blue_photos(inbox, 3, seed=9100)
    # Pets: a training photo and a validation photo (the margin is chosen to keep the validation photos)
    split = json.loads((root / "run" / "split.json").read_text())
    for name, relative in (("cat.jpg", split["train"][0]), ("dog.jpg", split["val"][-1])):
        (inbox / name).write_bytes((Path(split["root"]) / relative).read_bytes())
    model_file = run_export(ExportConfig(run=str(root / "run"), parity_images=4), log=quiet)
    return {"root": root, "run": root / "run", "result": result, "log": log, "inbox": inbox, "model": model_file,
            "later": later, "kaggle": kaggle}


def test_two_sources_merge_into_one_split_with_the_duplicate_reported(taught):
    run = taught["run"]
    split = json.loads((run / "split.json").read_text())
    assert isinstance(split["data"], list) and len(split["data"]) == 2 and split["layout"] == "kaggle+folders"
    assert len(split["train"]) + len(split["val"]) == 20 + 6  # 27 files, one byte-identical copy left out
    assert [source["duplicates_left_out"] for source in split["sources"]] == [0, 1]
    rows = list(csv.DictReader(open(run / DUPLICATES_FILE)))
    assert len(rows) == 1 and rows[0]["left_out"].endswith("later/dog/copy.jpg") and rows[0]["kept"].endswith("train/dog.3.jpg")
    assert any("duplicates: 1 byte-identical files left out" in line for line in taught["log"])
    # evaluate merges the sources again and finds the same validation split
    metrics = evaluate_run(EvaluateConfig(run=str(run), out=str(taught["root"] / "evaluation")), log=quiet)
    assert metrics["count"] == len(split["val"]) and "validation split" in metrics["data"]


def test_the_run_keeps_the_taught_examples_and_their_count(taught):
    meta = read_meta(taught["run"])
    assert (taught["run"] / NEITHER_FILE).is_file() and meta.taught_neither == 12 and meta.neither_margin is not None
    assert meta.neither_files[0] == "not-pets/blue/blue0.jpg" and meta.neither_keep == 0.998
    assert meta.neither_threshold is not None
    assert meta.neither_summary["photos"] == 12 and meta.metrics["accuracy"] >= 0.75  # the classes stay cat, dog
    assert meta.class_names == ["cat", "dog"]
    session = onnxruntime.InferenceSession(str(taught["model"]), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["neither_examples"] == "12"
    assert [output.name for output in session.get_outputs()][-4:] == ["ood_score", "neither_score", "neither_distance",
                                                                      "nearest_neither"]


def predict_rows(*arguments: str) -> list[dict]:
    assert main(["predict", *arguments, "--no-progress"]) == 0
    output = arguments[arguments.index("--output") + 1]
    return list(csv.DictReader(open(output)))


def test_a_taught_photo_is_refused_end_to_end_by_the_run_and_by_its_file(taught, tmp_path):
    inbox = str(taught["inbox"])
    by_run = predict_rows("--run", str(taught["run"]), inbox, "--output", str(tmp_path / "run.csv"))
    by_file = predict_rows("--model", str(taught["model"]), inbox, "--output", str(tmp_path / "file.csv"))
    assert list(by_run[0])[-6:] == ["ood_score", "in_distribution", "neither_score", "neither_distance", "refused_by",
                                    "nearest_neither"]
    rows = {Path(row["path"]).name: row for row in by_run}
    assert rows["taught.jpg"]["refused_by"] == REFUSED_TAUGHT and rows["taught.jpg"]["in_distribution"] == "false"
    assert rows["taught.jpg"]["nearest_neither"] == "not-pets/blue/blue5.jpg"  # the very example it is a copy of
    assert float(rows["taught.jpg"]["neither_distance"]) < 1e-3
    for name in ("blue0.jpg", "blue1.jpg", "blue2.jpg"):  # new blue photos: like the taught ones
        assert rows[name]["refused_by"] == REFUSED_TAUGHT and rows[name]["nearest_neither"].startswith("not-pets/blue/")
    for name in ("cat.jpg", "dog.jpg"):
        assert rows[name]["refused_by"] in ("", REFUSED_UNLIKE) and rows[name]["nearest_neither"] == ""
        assert (rows[name]["refused_by"] == "") == (rows[name]["in_distribution"] == "true")
    for mine, theirs in zip(by_run, by_file):
        assert mine["path"] == theirs["path"] and mine["refused_by"] == theirs["refused_by"]
        assert mine["nearest_neither"] == theirs["nearest_neither"] and mine["in_distribution"] == theirs["in_distribution"]
        assert float(mine["neither_distance"]) == pytest.approx(float(theirs["neither_distance"]), abs=1e-4)
        assert float(mine["neither_score"]) == pytest.approx(float(theirs["neither_score"]), abs=1e-4)


def test_the_exported_file_alone_gives_the_runs_scores_and_decisions(taught):
    """A plain ONNX Runtime session on the file, its metadata for the threshold and the margin, no catdog code in
    between: the same scores (1e-4) and decisions as the run's PyTorch network."""
    import torch

    predictor = load_model_file(taught["model"])
    photos = sorted(taught["inbox"].iterdir())
    images = np.stack([predictor.transform(Image.open(path).convert("RGB")) for path in photos])
    session = onnxruntime.InferenceSession(str(taught["model"]), providers=["CPUExecutionProvider"])
    stored = json.loads(session.get_modelmeta().custom_metadata_map["catdog_meta"])
    scores, head, distances, nearest = session.run(["ood_score", "neither_score", "neither_distance", "nearest_neither"],
                                                   {"images": images})
    refused = ((scores > stored["ood_threshold"]) | (head > stored["neither_threshold"])
               | (scores - distances > stored["neither_margin"]))
    network, _ = load_exportable(str(taught["run"]))
    with torch.inference_mode():
        reference = dict(zip(network.output_names, network(torch.from_numpy(images))))
    np.testing.assert_allclose(scores, reference["ood_score"].numpy(), atol=1e-4)
    np.testing.assert_allclose(distances, reference["neither_distance"].numpy(), atol=1e-4)
    np.testing.assert_allclose(head, reference["neither_score"].numpy(), atol=1e-4)
    assert nearest.tolist() == reference["nearest_neither"].numpy().tolist() and nearest.dtype == np.int64
    torch_refused = ((reference["ood_score"].numpy() > stored["ood_threshold"])
                     | taught_refusals(reference["ood_score"].numpy(), reference["neither_distance"].numpy(), stored["neither_margin"],
                                       reference["neither_score"].numpy(), stored["neither_threshold"]))
    assert refused.tolist() == torch_refused.tolist()
    assert refused.tolist() == [not d.in_distribution for d in predictor.decisions(scores, distances, nearest, head)]
    assert [stored["neither_files"][i] for i in nearest[[p.name == "taught.jpg" for p in photos]]] == ["not-pets/blue/blue5.jpg"]


def test_serve_answers_why_and_which_example(taught):
    inbox = taught["inbox"]
    with TestClient(create_app(ServeConfig(model=str(taught["model"])))) as client:
        answer = client.post("/predict", files={"file": ("t.jpg", (inbox / "taught.jpg").read_bytes(), "image/jpeg")}).json()
        assert answer["in_distribution"] is False and answer["refused_by"] == REFUSED_TAUGHT
        assert answer["nearest_neither"] == "not-pets/blue/blue5.jpg" and answer["neither_distance"] < 1e-3
        assert answer["neither_score"] > read_meta(taught["run"]).neither_threshold
        batch = client.post("/predict/batch", files=[("files", (name, (inbox / name).read_bytes(), "image/jpeg"))
                                                     for name in ("blue1.jpg", "cat.jpg")]).json()["results"]
        assert batch[0]["refused_by"] == REFUSED_TAUGHT and batch[0]["nearest_neither"].startswith("not-pets/blue/")
        assert batch[1]["refused_by"] in ("", REFUSED_UNLIKE) and batch[1]["nearest_neither"] is None
        explained = client.post("/explain", files={"file": ("t.jpg", (inbox / "taught.jpg").read_bytes(), "image/jpeg")}).json()
        assert explained["refused_by"] == REFUSED_TAUGHT and explained["nearest_neither"] == "not-pets/blue/blue5.jpg"
        assert client.get("/metrics").text.count("catdog_out_of_distribution_total") >= 1


def test_the_python_api_and_evaluate_say_the_same(taught, tmp_path):
    import catdog

    model = catdog.load(str(taught["run"]))
    predictions = {Path(p.path).name: p for p in model.predict(str(taught["inbox"]))}
    assert predictions["taught.jpg"].refused_by == REFUSED_TAUGHT and not predictions["taught.jpg"].in_distribution
    assert predictions["taught.jpg"].nearest_neither == "not-pets/blue/blue5.jpg"
    others = tmp_path / "others"
    blue_photos(others / "blue", 4, seed=9500)
    metrics = evaluate_run(EvaluateConfig(run=str(taught["run"]), out=str(tmp_path / "evaluation"), ood_data=str(others)),
                           log=quiet)
    found = metrics["out_of_distribution"]["taught"]
    assert found["examples"] == 12 and found["other_refused_by_taught"] == 4 and found["other_accepted_share"] == 0.0
    assert found["nearest_examples"] and found["nearest_examples"][0][0].startswith("not-pets/blue/")
    assert metrics["taught_neither"]["photos"] == metrics["out_of_distribution"]["validation_photos"]
    rows = list(csv.DictReader(open(tmp_path / "evaluation" / "ood_predictions.csv")))
    assert len(rows) == 4 and all(row["refused_by"] == REFUSED_TAUGHT and row["nearest_neither"] for row in rows)


def test_a_decision_names_the_taught_example_only_when_it_refused():
    class Network:
        outputs = ("logits", "features", "ood_score", "neither_score", "neither_distance", "nearest_neither")
        backend = "test"

    from catdog.runtime.predict import Predictor
    from catdog.runtime.runs import RunMeta
    from catdog.runtime.transforms import Preprocess

    meta = RunMeta("m", ["cat", "dog"], Preprocess(32), ood_method="knn", ood_threshold=0.5, neither_margin=0.1,
                   neither_threshold=1.0, neither_files=["a/1.jpg", "a/2.jpg"])
    predictor = Predictor(Network(), meta)
    # accepted; unlike the training photos; nearer an example by more than the margin; the head above its
    # threshold; both the score and the examples (the examples' reason is given)
    ood, distances = np.array([0.2, 0.6, 0.4, 0.3, 0.7]), np.array([0.5, 0.9, 0.2, 0.5, 0.1])
    head, nearest = np.array([0.0, 0.0, 0.0, 2.0, 0.0]), np.array([0, 1, 1, 1, 0])
    assert predictor.decisions(ood, distances, nearest, head) == [
        Decision(True), Decision(False, REFUSED_UNLIKE), Decision(False, REFUSED_TAUGHT, "a/2.jpg"),
        Decision(False, REFUSED_TAUGHT, "a/2.jpg"), Decision(False, REFUSED_TAUGHT, "a/1.jpg")]
    assert predictor.in_distribution(ood, distances, head).tolist() == [True, False, False, False, False]
    assert predictor.in_distribution(ood).tolist() == [True, False, True, True, False]  # the automatic rule alone
    assert predictor.decide(0.3, 0.5, 1, 2.0) == Decision(False, REFUSED_TAUGHT, "a/2.jpg")


def test_a_run_without_neither_is_as_before(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="efficientnet_lite0", strategy="head", epochs=3,
                      num_workers=0, progress=False, image_size=64), log=quiet)
    meta = read_meta(tmp_path / "run")
    assert not (tmp_path / NEITHER_FILE).exists() and not (tmp_path / "run" / NEITHER_FILE).exists()
    assert meta.neither_margin is None and meta.taught_neither == 0 and not (tmp_path / "run" / DUPLICATES_FILE).exists()
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["data"] == str(data.resolve()) and "sources" not in split
    model_file = run_export(ExportConfig(run=str(tmp_path / "run"), parity_images=2), log=quiet)
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()][-1] == "ood_score"
    assert session.get_modelmeta().custom_metadata_map["neither_examples"] == "0"
    colour_image(0, 1).save(tmp_path / "photo.jpg")
    rows = predict_rows("--model", str(model_file), str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "p.csv"))
    assert list(rows[0]) == ["path", "label", "confidence", "prob_cat", "prob_dog", "ood_score", "in_distribution"]
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        buffer = io.BytesIO()
        colour_image(0, 1).save(buffer, format="JPEG")
        answer = client.post("/predict", files={"file": ("p.jpg", buffer.getvalue(), "image/jpeg")}).json()
    assert not {"refused_by", "nearest_neither", "neither_distance", "neither_score"} & set(answer)


def test_the_taught_examples_head_and_bank_save_load_and_compute_alike_in_the_graph(tmp_path):
    import torch

    from catdog.training.neither import TaughtNeither

    generator = np.random.default_rng(0)
    basis = np.abs(generator.normal(size=(16, 320)))
    pets = (np.abs(generator.normal(size=(300, 16))) @ basis).astype(np.float32)
    examples = (np.abs(generator.normal(size=(40, 16))) @ basis + 3 * np.abs(generator.normal(size=(40, 320)))).astype(np.float32)
    taught, chosen = TaughtNeither.fit(examples, pets)
    assert chosen.tolist() == list(range(40)) and taught.bank.k == 1
    assert taught.scores(examples).min() > np.median(taught.scores(pets))  # the head puts them on their side
    taught.save(tmp_path / NEITHER_FILE)
    loaded = TaughtNeither.load(tmp_path / NEITHER_FILE)
    queries = np.r_[pets[:5], examples[:5]]
    for mine, theirs in zip(taught.outputs(queries), loaded.outputs(queries)):
        np.testing.assert_array_equal(mine, theirs)
    with torch.no_grad():
        graph = [value.numpy() for value in loaded.module()(torch.from_numpy(queries))]
    head, distances, nearest = loaded.outputs(queries)
    np.testing.assert_allclose(graph[0], head, atol=1e-4)
    np.testing.assert_allclose(graph[1], distances, atol=1e-5)
    assert graph[2].tolist() == nearest.tolist() and nearest[5:].tolist() == [0, 1, 2, 3, 4]  # each example is its own nearest


def test_a_fine_tuned_run_learns_its_examples_from_its_own_network(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    blue_photos(tmp_path / "blue", 8)
    train(TrainConfig(data=str(data), neither=[str(tmp_path / "blue")], out=str(tmp_path / "run"), model="simple_cnn",
                      strategy="finetune", epochs=2, batch_size=8, lr=3e-3, image_size=32, num_workers=0, progress=False,
                      early_stopping=0), log=quiet)
    meta = read_meta(tmp_path / "run")
    assert meta.strategy == "finetune" and meta.taught_neither == 8 and meta.neither_threshold is not None
    model_file = run_export(ExportConfig(run=str(tmp_path / "run"), parity_images=2), log=quiet)
    rows = predict_rows("--model", str(model_file), str(tmp_path / "blue" / "blue3.jpg"), "--output", str(tmp_path / "p.csv"))
    assert rows[0]["refused_by"] == REFUSED_TAUGHT and rows[0]["nearest_neither"] == "blue/blue3.jpg"
