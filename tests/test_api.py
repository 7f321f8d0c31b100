"""The Python API: `catdog.training.train/evaluate/tune/load` call the commands' own functions; the package stays lazy; the
command modules of the same names keep working as modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_image, make_kaggle_folder
from PIL import Image

import catdog
from catdog.runtime.data import DataError
from catdog.runtime.images import ImageLoadError

SRC = Path(__file__).resolve().parents[1] / "src"


def run_python(code: str) -> str:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_catdog_does_not_import_torch_or_the_api():
    loaded = run_python("import sys, catdog; print(sorted(m for m in ('torch', 'catdog.api', 'catdog.training.train') if m in sys.modules))")
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("first", ["attribute", "import_as", "from_import"])
def test_each_name_has_one_meaning_whatever_was_imported_first(first):
    """`catdog.train`, `catdog.evaluate`, `catdog.tune` are the API's functions, however the command modules (which
    live in their layer, `catdog.training.train`, ...) were reached first; every module is a plain module (no
    module-class swap), and the package's attributes are never a command module (a fresh interpreter per order)."""
    reach_first = {
        "attribute": "import catdog.training.train, catdog.training.evaluate, catdog.training.tune; catdog.training.train.train",
        "import_as": "import catdog.training.train as t; import catdog.training.evaluate as e; import catdog.training.tune as u; assert t.TrainConfig",
        "from_import": "from catdog.training.train import TrainConfig; from catdog.training.evaluate import EvaluateConfig; from catdog.training.tune import TuneConfig",
    }[first]
    code = f"""
import inspect, sys, types, catdog
{reach_first}
import catdog.api
for name in ("train", "evaluate", "tune"):
    assert getattr(catdog, name) is getattr(catdog.api, name), name
    assert inspect.isfunction(getattr(catdog, name)), name
    assert type(sys.modules["catdog.training." + name]) is types.ModuleType, name
    try:
        getattr(catdog, name)("somewhere", no_such_option=1)
    except TypeError as error:
        assert f"catdog.{{name}}() got unknown option(s) no_such_option" in str(error), error
    else:
        raise AssertionError(name)
assert "run_dir" in inspect.signature(catdog.train).parameters and "data" in inspect.signature(catdog.evaluate).parameters
assert all(type(module) is types.ModuleType for name, module in sys.modules.items() if name.startswith("catdog"))
assert not [name for name in dir(catdog) if isinstance(getattr(catdog, name), types.ModuleType)
            and name in catdog.API_NAMES]
print("ok")
"""
    assert run_python(code).strip() == "ok"


def test_plots_keep_a_backend_the_program_chose():
    """catdog's PNG plots use Agg, but leave alone a backend chosen before (a notebook's inline backend)."""
    draw = "from catdog.training.plotting import headless_pyplot; plt = headless_pyplot(); plt.close(plt.figure()); "
    assert run_python(draw + "import matplotlib; print(matplotlib.get_backend())").strip().lower() == "agg"
    chosen = "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot; "
    assert run_python(chosen + draw + "print(matplotlib.get_backend())").strip().lower() == "svg"


def test_monkeypatch_by_dotted_name_reaches_the_module(monkeypatch):
    import catdog.training.train

    def always_finetune(config, device, train_images):
        return "finetune"

    # resolve_strategy: a name the command's own train() looks up in its module (defined in catdog.training.config)
    monkeypatch.setattr("catdog.training.train.resolve_strategy", always_finetune)
    assert catdog.training.train.resolve_strategy is always_finetune


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = make_kaggle_folder(root / "train", per_class=14)
    run = catdog.train(data=data, run_dir=root / "run", model="simple_cnn", strategy="finetune", epochs=3,
                       batch_size=8, lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0, log=None)
    return run, data


def test_train_returns_the_run(api_run):
    run, data = api_run
    assert isinstance(run, catdog.Run)
    assert (run.path / "model.safetensors").is_file()
    assert run.config["resolved_strategy"] == "finetune" and run.config["epochs"] == 3
    assert run.config["data"] == str(data)
    assert 0.0 <= run.metrics["accuracy"] <= 1.0 and run.metrics["log_loss"] > 0
    assert run.class_names == ["cat", "dog"]
    assert [row["epoch"] for row in run.history] == [1.0, 2.0, 3.0]
    assert catdog.Run.open(str(run.path)).metrics == run.metrics


def test_train_refuses_bad_options(tmp_path, kaggle_data):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        catdog.train(data=kaggle_data, preset="huge", run_dir=tmp_path / "run")
    with pytest.raises(TypeError, match="valid: data, out, preset"):
        catdog.train(data=kaggle_data, run_dir=tmp_path / "run", learning_rate=0.1)
    with pytest.raises(TypeError, match="run_dir or out"):
        catdog.train(data=kaggle_data, run_dir=tmp_path / "run", out=tmp_path / "other")


def test_evaluate_returns_what_it_wrote(api_run, tmp_path):
    run, _ = api_run
    metrics = catdog.evaluate(run, out=tmp_path / "evaluation", backend="torch", log=None)
    written = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["accuracy"] == written["accuracy"] and metrics["confusion_matrix"] == written["confusion_matrix"]
    assert metrics["data"].startswith("validation split")
    assert sum(map(sum, metrics["confusion_matrix"])) == len(json.loads((run.path / "split.json").read_text())["val"])
    on_other_data = catdog.evaluate(str(run.path), make_kaggle_folder(tmp_path / "other", per_class=3),
                                    out=tmp_path / "other-evaluation", backend="torch", log=None)
    assert sum(map(sum, on_other_data["confusion_matrix"])) == 6


def test_predict_files_folders_and_pil_images_in_input_order(api_run, tmp_path):
    run, data = api_run
    model = catdog.load(run, backend="torch")
    assert model.class_names == ["cat", "dog"] and model.run.path == run.path
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        colour_image(1, 900 + index).save(folder / f"{index}.jpg")
    (folder / ".DS_Store").write_bytes(b"\x00")  # passed over quietly, as by `catdog predict`
    (folder / "notes.txt").write_text("not a photo")
    cat_file = data / "cat.0.jpg"
    with Image.open(cat_file) as opened:
        in_memory = opened.copy()  # a copy has no file name
    rgba = colour_image(1, 950).convert("RGBA")

    predictions = model.predict([cat_file, str(folder), in_memory, rgba])

    assert [p.path for p in predictions] == [str(cat_file)] + [str(folder / f"{i}.jpg") for i in range(3)] + [None, None]
    for prediction in predictions:
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction.confidence == max(prediction.probabilities.values())
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
    # The same photo as a file and as a PIL image gets the same probabilities (one preprocessing).
    assert predictions[4].probabilities == pytest.approx(predictions[0].probabilities, abs=1e-5)
    # And the same as the command's predictor on the same file.
    direct = model.predictor.predict_files([cat_file]).probabilities[0]
    assert np.allclose([predictions[0].probabilities[name] for name in model.class_names], direct, atol=1e-6)
    [single] = model.predict(folder / "0.jpg")
    # Alone rather than in a batch of six: the same answer (the convolutions may sum in another order: 1e-6).
    assert (single.path, single.label) == (predictions[1].path, predictions[1].label)
    assert single.probabilities == pytest.approx(predictions[1].probabilities, abs=1e-6)


def test_predict_unreadable_inputs_raise_or_are_skipped(api_run, tmp_path):
    run, data = api_run
    model = catdog.load(run.path, backend="torch")
    broken = tmp_path / "broken.jpg"
    broken.write_text("<html>not an image</html>")
    with pytest.raises(ImageLoadError, match="broken.jpg: not an image"):
        model.predict([data / "dog.1.jpg", broken])
    with pytest.raises(ImageLoadError, match="missing.jpg: file not found"):
        model.predict(tmp_path / "missing.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictions = model.predict([data / "dog.1.jpg", broken], skip_unreadable=True)
    assert [p.path for p in predictions] == [str(data / "dog.1.jpg")]
    assert any("broken.jpg" in str(warning.message) for warning in caught)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in .*empty"):
        model.predict(tmp_path / "empty")
    with pytest.raises(TypeError, match="not int"):
        model.predict([3])


def test_an_exported_file_and_the_run_on_onnx_runtime_predict_like_torch(api_run, tmp_path):
    """catdog.load(model=FILE), catdog.load(run) on ONNX Runtime and catdog.load(run, backend="torch"): the same
    probabilities and heatmaps; a file alone predicts without importing torch."""
    from catdog.cli import main

    run, data = api_run
    out = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run.path), "--out", str(out)]) == 0
    from_file = catdog.load(model=out, device="cpu")
    from_run = catdog.load(run, backend="onnxruntime", device="cpu")
    with_torch = catdog.load(run, backend="torch", device="cpu")
    assert from_file.run is None and from_file.class_names == ["cat", "dog"] and from_run.run.path == run.path
    assert [m.predictor.backend for m in (from_file, from_run, with_torch)] == ["onnxruntime", "onnxruntime", "torch"]
    photos = [data / "cat.0.jpg", data / "dog.0.jpg", colour_image(1, 77)]
    reference = with_torch.predict(photos)
    photo = data / "dog.1.jpg"
    explained = with_torch.explain(photo)
    for model in (from_file, from_run):
        predictions = model.predict(photos)
        assert [p.label for p in predictions] == [r.label for r in reference]
        for prediction, expected in zip(predictions, reference):
            assert prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
        explanation = model.explain(photo)
        assert explanation.label == explained.label
        assert np.allclose(explanation.probabilities, explained.probabilities, atol=1e-5)
        assert np.allclose(explanation.heatmap, explained.heatmap, atol=1e-3)
    with pytest.raises(ValueError, match="give a run or model=, not both"):
        catdog.load(run, model=out)

    code = f"""
import sys, catdog
model = catdog.load(model={str(out)!r}, device="cpu")
[prediction] = model.predict({str(photo)!r})
assert model.explain({str(photo)!r}).label == prediction.label
print(prediction.label, round(prediction.confidence, 5), "torch" in sys.modules)
"""
    label, confidence, torch_imported = run_python(code).split()
    expected = with_torch.predict(photo)[0]
    assert (label, float(confidence), torch_imported) == (expected.label, pytest.approx(expected.confidence, abs=2e-5), "False")


@pytest.mark.slow
def test_load_without_a_run_is_the_builtin_model():
    model = catdog.load(backend="torch")
    assert model.run is None and model.class_names == ["cat", "dog"]
    picture = colour_image(0, 1, size=(96, 80))
    [prediction] = model.predict(picture)
    assert set(prediction.probabilities) == {"cat", "dog"}
    explanation = model.explain(picture)
    assert explanation.label == prediction.label and explanation.heatmap.shape == (80, 96)


def test_load_refuses_what_is_not_a_run(tmp_path):
    from catdog.runtime.runs import RunError

    with pytest.raises(RunError, match="not a catdog run directory"):
        catdog.load(tmp_path)
    with pytest.raises(RunError, match="refusing to load a pickled file"):
        catdog.load(tmp_path / "model.pt")
    with pytest.raises(RunError, match="refusing to load a pickled file"):
        catdog.load(model=tmp_path / "model.pt")
    photo_as_model = tmp_path / "model.onnx"
    colour_image(0, 3).save(photo_as_model, format="PNG")
    with pytest.raises(RunError, match=f"{photo_as_model}: not a readable ONNX model"):
        catdog.load(model=photo_as_model)


@pytest.mark.slow
def test_tune_best_params_train_a_run(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    study = catdog.tune(data, preset="fast", trials=2, max_epochs=5, out=tmp_path / "tune", progress=False, log=None)
    assert study["trials"] == 2 and (tmp_path / "tune" / "best_config.yaml").is_file()
    run = catdog.train(data, preset="fast", run_dir=tmp_path / "run", progress=False, log=None, **study["best_params"])
    for name, value in study["best_params"].items():
        assert run.config[name] == value


def test_explain_a_file_and_a_pil_image(api_run):
    run, data = api_run
    model = catdog.load(run, backend="torch")
    photo_path = data / "dog.1.jpg"
    [prediction] = model.predict(photo_path)
    explanation = model.explain(photo_path)
    with Image.open(photo_path) as opened:
        width, height = opened.size
        from_memory = model.explain(opened.copy())
    assert explanation.label == prediction.label
    assert np.allclose(explanation.probabilities, [prediction.probabilities[name] for name in model.class_names], atol=1e-4)
    assert explanation.heatmap.shape == (height, width) and 0.0 <= explanation.heatmap.min() <= explanation.heatmap.max() <= 1.0
    assert explanation.overlay().size == (width, height)
    assert np.allclose(from_memory.heatmap, explanation.heatmap, atol=1e-5)
    other = "cat" if prediction.label == "dog" else "dog"
    against = model.explain(photo_path, target=other)
    assert np.allclose(against.probabilities, explanation.probabilities) and not np.allclose(against.heatmap, explanation.heatmap)
    with pytest.raises(ValueError, match="unknown class 'horse'"):
        model.explain(photo_path, target="horse")
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        model.explain(data / "missing.jpg")
