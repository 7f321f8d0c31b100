"""predict's CSV, submission and error handling; evaluate's metrics on cases with known answers; the CLI."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
from conftest import colour_image, make_kaggle_folder

from catdog.cli import main
from catdog.training.evaluate import EvaluateConfig, evaluate_run, most_confident_mistakes
from catdog.training.metrics import classification_metrics
from catdog.runtime.predict import EXIT_SOME_FILES_FAILED, kaggle_id
from catdog.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_kaggle_folder(root / "train", per_class=14)
    config = TrainConfig(data=str(data), out=str(root / "run"), model="simple_cnn", strategy="finetune", epochs=3,
                         batch_size=8, lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0)
    train(config, log=lambda _: None)
    return root / "run", data


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_predict_folder_csv_submission_and_errors(trained_run, tmp_path, capsys):
    run, _ = trained_run
    folder = tmp_path / "test1"
    (folder / "sub").mkdir(parents=True)
    for i in range(1, 4):
        colour_image(1, 500 + i).save(folder / f"{i}.jpg")
    colour_image(0, 600).save(folder / "sub" / "4.jpg")
    (folder / "5.jpg").write_text("<html>not an image</html>")
    (folder / ".DS_Store").write_bytes(b"\x00")
    output = tmp_path / "preds.csv"
    code = main(["predict", str(folder), "--run", str(run), "--output", str(output), "--submission",
                 str(tmp_path / "sub.csv"), "--no-progress", "--backend", "torch"])
    assert code == EXIT_SOME_FILES_FAILED
    rows = read_csv(output)
    assert len(rows) == 4 and list(rows[0]) == ["path", "label", "confidence", "prob_cat", "prob_dog", "ood_score",
                                                 "in_distribution"]
    by_name = {row["path"].split("/")[-1]: row for row in rows}
    assert by_name["4.jpg"]["label"] == "cat" and by_name["1.jpg"]["label"] == "dog"
    for row in rows:
        assert float(row["prob_cat"]) + float(row["prob_dog"]) == pytest.approx(1.0, abs=1e-5)
        assert float(row["confidence"]) == max(float(row["prob_cat"]), float(row["prob_dog"]))
        assert np.isfinite(float(row["ood_score"])) and row["in_distribution"] in ("true", "false")
    submission = read_csv(tmp_path / "sub.csv")
    assert [row["id"] for row in submission] == ["1", "2", "3", "4"]
    assert all(0.005 <= float(row["label"]) <= 0.995 for row in submission)
    assert float(submission[0]["label"]) == pytest.approx(float(by_name["1.jpg"]["prob_dog"]), abs=1e-6) or float(submission[0]["label"]) == 0.995
    errors = read_csv(tmp_path / "preds.errors.csv")
    assert [e["path"].split("/")[-1] for e in errors] == ["5.jpg"]
    assert "5.jpg" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported_model(trained_run, tmp_path_factory):
    """The run exported to one deployable file (`catdog export --run RUN --out FILE`)."""
    run, _ = trained_run
    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    return out


def test_model_file_run_and_torch_backend_agree(trained_run, exported_model, tmp_path):
    """`--model FILE` (what a runtime-only install runs), `--run RUN` (exported on first use, ONNX Runtime) and
    `--backend torch` (PyTorch) give the same probabilities for every photo."""
    run, data = trained_run
    ways = {
        "model": ["--model", str(exported_model)],
        "run": ["--run", str(run), "--backend", "onnxruntime"],
        "torch": ["--run", str(run), "--backend", "torch"],
    }
    outputs = {}
    for name, options in ways.items():
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(data), *options, "--output", str(out), "--no-progress"]) == 0
        outputs[name] = {row["path"]: np.array([float(row["prob_cat"]), float(row["prob_dog"])]) for row in read_csv(out)}
    assert len(outputs["model"]) == 28
    for name in ("run", "torch"):
        assert outputs[name].keys() == outputs["model"].keys()
        assert max(np.abs(outputs[name][path] - outputs["model"][path]).max() for path in outputs["model"]) < 1e-5, name
    assert not (run / "model.onnx").exists()  # --run exported into the cache, not into the run


def test_predict_refuses_a_file_that_is_not_a_model_naming_it(tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    colour_image(1, 5).save(photo)
    output = tmp_path / "preds.csv"

    def predict_with(model) -> str:
        assert main(["predict", str(photo), "--model", str(model), "--output", str(output), "--no-progress"]) == 1
        error = capsys.readouterr().err
        assert str(model) in error and len(error.strip().splitlines()) == 1, error
        assert not output.exists()
        return error

    png = tmp_path / "model.onnx"
    colour_image(0, 6).save(png, format="PNG")  # a photo renamed .onnx
    assert "not a readable ONNX model" in predict_with(png)

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return marker.touch, ()  # what loading this pickle would do

    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps(Payload()))
    assert "refusing to load a pickled file" in predict_with(pickled)
    assert not marker.exists()
    assert "model file not found" in predict_with(tmp_path / "missing.onnx")
    assert "for a run directory use --run" in predict_with(tmp_path)


def test_without_the_train_extra_predict_runs_an_exported_file_only(trained_run, exported_model, tmp_path, monkeypatch,
                                                                     capsys):
    """`pip install catdog` alone (simulated: the train extra's packages reported missing): `catdog train` and a
    run without a current model.onnx stop with one line naming catdog[train]; an exported file predicts."""
    import catdog.runtime.extras

    installed = catdog.runtime.extras.missing_packages
    monkeypatch.setattr(catdog.runtime.extras, "missing_packages",
                        lambda extra: ["torch", "timm"] if extra == "train" else installed(extra))
    run, data = trained_run
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "catdog train needs catdog[train]" in line and "torch" in line and "pip install 'catdog[train]'" in line
    assert not (tmp_path / "run").exists()

    output = tmp_path / "preds.csv"
    assert main(["predict", str(data), "--run", str(run), "--output", str(output), "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"catdog export --run {run}" in line and "catdog[train]" in line and not output.exists()
    assert main(["predict", str(data), "--model", str(exported_model), "--output", str(output), "--no-progress"]) == 0
    assert len(read_csv(output)) == 28


def test_evaluate_writes_metrics_and_plots_for_the_validation_split(trained_run, tmp_path):
    run, _ = trained_run
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--backend", "torch"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert metrics["count"] == len(split["val"])
    assert {"accuracy", "log_loss", "roc_auc", "per_class", "confusion_matrix"} <= set(metrics)
    for name in ("confusion_matrix.png", "roc.png", "mistakes.png"):
        assert (tmp_path / "ev" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(tmp_path / "ev" / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted(split["val"])
    assert np.mean([int(r["correct"]) for r in rows]) == pytest.approx(metrics["accuracy"])
    for row in rows:
        probability_of_truth = float(row[f"p_{row['label']}"])
        assert float(row["loss"]) == pytest.approx(-np.log(max(probability_of_truth, 1e-15)), abs=1e-5)
        assert row["predicted"] == max(("cat", "dog"), key=lambda name: float(row[f"p_{name}"]))


def test_evaluating_a_head_run_reads_the_features_training_cached(tmp_path, monkeypatch):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    cache, run = tmp_path / "cache", tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), model="efficientnet_lite0", strategy="head", epochs=10, image_size=64,
                      num_workers=0, progress=False, cache_dir=str(cache)), log=lambda _: None)
    whole = evaluate_run(EvaluateConfig(run=str(run), out=str(tmp_path / "whole"), feature_cache=False, backend="torch"),
                         log=lambda _: None)

    def backbone_must_not_run(*arguments, **options):
        raise AssertionError("the backbone ran although training cached the features of every validation photo")

    import catdog.training.features

    monkeypatch.setattr(catdog.training.features, "make_backbone_runner", backbone_must_not_run)
    cached = evaluate_run(EvaluateConfig(run=str(run), out=str(tmp_path / "cached"), cache_dir=str(cache)), log=lambda _: None)
    assert cached["count"] == whole["count"] == 4 and cached["accuracy"] == whole["accuracy"]
    by_path = {row["path"]: row for row in read_csv(tmp_path / "whole" / "predictions.csv")}
    for row in read_csv(tmp_path / "cached" / "predictions.csv"):
        # Same numbers up to the float16 rounding of cached features.
        assert float(row["p_dog"]) == pytest.approx(float(by_path[row["path"]]["p_dog"]), abs=5e-3)
    # A photo the cache has never seen needs the backbone, and gets it.
    monkeypatch.undo()
    other = tmp_path / "other"
    make_kaggle_folder(other, per_class=3, size=(72, 56))
    fresh = evaluate_run(EvaluateConfig(run=str(run), data=str(other), out=str(tmp_path / "fresh"), cache_dir=str(cache)),
                         log=lambda _: None)
    assert fresh["count"] == 6


def test_most_confident_mistakes_come_first():
    labels = np.array([0, 1, 0, 1, 0])
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.05, 0.95], [0.2, 0.8], [0.3, 0.7]])
    assert most_confident_mistakes(labels, probabilities, 10).tolist() == [2, 4, 1]
    assert most_confident_mistakes(labels, probabilities, 2).tolist() == [2, 4]
    assert most_confident_mistakes(labels[:1], probabilities[:1], 10).tolist() == []


def test_metrics_on_a_case_with_known_answers():
    labels = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9]])
    metrics = classification_metrics(labels, probabilities, ["cat", "dog"])
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["confusion_matrix"] == [[2, 1], [0, 2]]
    assert metrics["per_class"]["cat"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert metrics["per_class"]["dog"]["precision"] == pytest.approx(2 / 3)
    assert metrics["roc_auc"] == pytest.approx(5 / 6)  # 5 of the 6 (dog, cat) pairs rank the dog higher
    expected_log_loss = -np.mean(np.log([0.9, 0.8, 0.3, 0.6, 0.9]))
    assert metrics["log_loss"] == pytest.approx(expected_log_loss)


def test_kaggle_ids_from_file_names(tmp_path):
    assert kaggle_id(tmp_path / "123.jpg") == "123" and kaggle_id(tmp_path / "img_0042.png") == "0042"


def test_cli_errors_name_the_problem_and_exit_non_zero(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--model", "nope"]) == 2
    assert "valid models" in capsys.readouterr().err
    (tmp_path / "weights.pth").write_bytes(b"pickle")
    assert main(["predict", str(tmp_path), "--run", str(tmp_path / "weights.pth")]) == 1
    assert "pickled" in capsys.readouterr().err


def test_data_inspect_reports_counts_and_writes_a_grid(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=5)
    (data / "dog.77.jpg").write_bytes(b"")
    assert main(["data", "inspect", str(data), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["classes"] == {"cat": 5, "dog": 6}
    assert report["unreadable"] == [{"path": str(data / "dog.77.jpg"), "problem": "empty file"}]
    assert report["size"]["width"]["max"] == 64
    assert (tmp_path / "report" / "sample_grid.png").stat().st_size > 1000
