"""Export, reload, compare: the deployable ONNX file (format catdog-model/1: logits, features, class maps and the
out-of-distribution score, the run's metadata, heatmap offset and weights digest inside) matches PyTorch; a stale RUN/model.onnx is never used;
the built-in model exports too; TorchScript files carry their metadata; a failed parity check writes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import colour_image, make_kaggle_folder
from onnx import TensorProto, helper, numpy_helper

from catdog.training import export as export_module
from catdog.training.checkpoint import load_model, save_model
from catdog.cli import main
from catdog.training.export import ExportConfig, ExportParityError, builtin_model_file, open_run_with_export, parity_batch, run_export
from catdog.model_files import open_model

from catdog.runtime.model_file import MODEL_FORMAT, load_model_file, open_run
from catdog.runtime.runs import weights_digest
from catdog.runtime.runs import RunError, RunMeta, read_meta
from catdog.training.train import TrainConfig, train
from catdog.runtime.transforms import DENOISE_ABOVE

OUTPUTS = ("logits", "features", "class_maps", "ood_score")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_kaggle_folder(root / "train", per_class=10)
    train(TrainConfig(data=str(data), out=str(root / "run"), model="efficientnet_lite0", strategy="head", epochs=5,
                      num_workers=0, progress=False, image_size=64, denoise_above=DENOISE_ABOVE), log=lambda _: None)
    return root / "run"


def copy_of(run_dir, tmp_path):
    """A copy of the module's run that a test may export into or change."""
    return shutil.copytree(run_dir, tmp_path / "run")


def test_onnx_export_reload_compare(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert tuple(output.name for output in session.get_outputs()) == OUTPUTS
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["catdog_format"] == MODEL_FORMAT == "catdog-model/1"
    assert json.loads(metadata["class_names"]) == ["cat", "dog"]
    assert json.loads(metadata["preprocess"])["input_size"] == 64
    assert json.loads(metadata["preprocess"])["denoise_above"] == DENOISE_ABOVE  # the noise filter travels too
    assert RunMeta.from_dict(json.loads(metadata["catdog_meta"])) == read_meta(run_dir)
    # the digest of what the export is made of: the weights, the out-of-distribution bank, the run's meta.json
    made_of = b"".join((run_dir / name).read_bytes() for name in ("model.safetensors", "ood.safetensors", "meta.json"))
    assert metadata["weights_sha1"] == hashlib.sha1(made_of).hexdigest()
    offset = json.loads(metadata["heatmap_offset"])
    # EfficientNet's stride-32 cells look about (32 - 1) / 2 pixels up and left of where upsampling puts them.
    assert len(offset) == 2 and all(-32 < value < 0 for value in offset), offset

    model, meta = load_model(run_dir)
    batch = parity_batch(run_dir, meta.preprocess, 8)
    assert batch.shape == (4, 3, 64, 64)  # the four real validation images (2 per class of 10)
    logits, features, class_maps, ood_score = session.run(None, {"images": batch.numpy()})
    with torch.inference_mode():
        reference = torch.softmax(model(batch) / meta.temperature, 1).numpy()
        head = model.head(torch.from_numpy(features)).numpy()
    exported = torch.softmax(torch.from_numpy(logits) / float(metadata["temperature"]), 1).numpy()
    assert np.abs(reference - exported).max() <= 1e-4
    assert features.shape[0] == 4 and np.allclose(head, logits, atol=1e-4)  # "features" is what the head sees
    assert class_maps.shape == (4, 2, 2, 2) and (class_maps >= 0).all()  # a ReLU'd 2x2 map per class at 64 px
    assert ood_score.shape == (4,) and np.isfinite(ood_score).all() and meta.ood_threshold is not None

    # The runtime reads everything back from the one file.
    predictor = load_model_file(out)
    assert predictor.backend == "onnxruntime" and predictor.network.outputs == OUTPUTS and predictor.has_heatmaps
    assert predictor.meta.to_dict() == meta.to_dict() and predictor.source == str(out)
    assert predictor.preprocess.denoise_above == DENOISE_ABOVE
    assert predictor.heatmap_offset == pytest.approx(tuple(offset))
    np.testing.assert_allclose(predictor.probabilities(batch.numpy(), tta=False), reference, atol=1e-4)


def test_export_defaults_to_the_run_and_a_stale_model_file_is_not_used(run_dir, tmp_path):
    run = copy_of(run_dir, tmp_path)
    cache = tmp_path / "cache"
    assert main(["export", "--run", str(run)]) == 0
    own = run / "model.onnx"
    current = open_run(run)
    assert current.source == str(own)
    assert open_run_with_export(str(run), cache).source == str(own) and open_model(run=str(run), cache_dir=cache).source == str(own)
    assert not (cache / "models").exists()  # the run's own file is current: nothing exported again

    # An edited meta.json (here the temperature) is part of what the file serves: the old file is stale too.
    meta_path = run / "meta.json"
    original_meta = meta_path.read_text()
    meta_path.write_text(json.dumps({**json.loads(original_meta), "temperature": 2.5}))
    with pytest.raises(RunError, match="no model.onnx exported from its current weights"):
        open_run(run)  # without the training layer's export, a stale file is refused, never served
    meta_path.write_text(original_meta)
    assert open_run(run).source == str(own)

    model, meta = load_model(run)
    with torch.no_grad():
        model.head.weight.mul_(-1.0)  # new weights after the export: model.onnx no longer matches them
    save_model(run, model, meta)
    with pytest.raises(RunError, match="no model.onnx exported from its current weights"):
        open_run(run)
    fresh = Path(open_run_with_export(str(run), cache).source)
    assert fresh != own and fresh.parent == cache / "models" and fresh.is_file()
    assert open_model(run=str(run), cache_dir=cache).source == str(fresh)
    predictor = load_model_file(fresh)
    assert predictor.network.metadata["weights_sha1"] == weights_digest(run) != current.network.metadata["weights_sha1"]
    batch = parity_batch(run, meta.preprocess, 4)
    with torch.inference_mode():
        reference = torch.softmax(model(batch) / meta.temperature, 1).numpy()
    np.testing.assert_allclose(predictor.probabilities(batch.numpy(), tta=False), reference, atol=1e-4)
    assert not np.allclose(current.probabilities(batch.numpy(), tta=False), reference, atol=1e-2)


def test_export_the_builtin_model(tmp_path):
    out = tmp_path / "builtin.onnx"
    assert main(["export", "--builtin", "--out", str(out), "--parity-images", "2"]) == 0
    predictor = load_model_file(out)
    assert predictor.is_zero_training and predictor.class_names == ["cat", "dog"]
    assert predictor.network.outputs == OUTPUTS and predictor.has_heatmaps
    assert predictor.network.metadata["catdog_format"] == MODEL_FORMAT and predictor.network.metadata["weights_sha1"] == ""
    from catdog.training.backends import load_torch_predictor

    pictures = [colour_image(label, 40 + label, size=(96, 80)) for label in (0, 1)]
    np.testing.assert_allclose(predictor.predict_pil(pictures), load_torch_predictor(None, "cpu").predict_pil(pictures),
                               atol=1e-4)


def test_export_needs_a_run_or_builtin_not_both(run_dir, tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", "--run", str(run_dir), "--builtin", "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.count("give --run RUN or --builtin") == 2
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_not_an_export_is_refused_naming_it(run_dir, tmp_path):
    plain = tmp_path / "plain.onnx"
    export_module.export_onnx_module(torch.nn.Conv2d(3, 2, 3), plain, 16)  # ONNX, but no catdog metadata
    with pytest.raises(RunError, match=f"{plain}: not a catdog catdog-model/1 model file"):
        load_model_file(plain)
    with pytest.raises(RunError, match="model file not found"):
        load_model_file(tmp_path / "missing.onnx")
    with pytest.raises(RunError, match="for a run directory use --run"):
        load_model_file(run_dir)


def test_torchscript_export_carries_metadata(run_dir, tmp_path):
    out = run_export(ExportConfig(run=str(run_dir), format="torchscript", out=str(tmp_path / "m.pt")), log=lambda _: None)
    extra = {"class_names": "", "catdog_format": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    text = {key: value.decode() if isinstance(value, bytes) else value for key, value in extra.items()}
    assert json.loads(text["class_names"]) == ["cat", "dog"] and text["catdog_format"] == MODEL_FORMAT
    assert loaded(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_failed_parity_fails_loudly_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    run = copy_of(run_dir, tmp_path / "copy")
    before = sorted(path.name for path in run.iterdir())
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportParityError, match="exceeds"):
        run_export(ExportConfig(run=str(run_dir), out=str(tmp_path / "bad.onnx")), log=lambda _: None)
    assert list(tmp_path.iterdir()) == [tmp_path / "copy"]  # no bad.onnx, no staging file
    with pytest.raises(ExportParityError, match="exceeds"):
        run_export(ExportConfig(run=str(run)), log=lambda _: None)  # the default: RUN/model.onnx
    assert sorted(path.name for path in run.iterdir()) == before  # no model.onnx, no staging file left
    with pytest.raises(ExportParityError, match="exceeds"):
        open_run_with_export(str(run), tmp_path / "cache")  # an export on first use is checked the same way
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]


@pytest.mark.parametrize("threads", [None, 1], ids=["prediction", "features"])
def test_onnx_sessions_leave_the_callers_floating_point_alone(threads):
    """catdog runs ONNX Runtime inside the user's process (the Python API, serve, tests): building and running a
    session must not switch the calling thread to flush-denormals-to-zero, which would change every later float
    operation of that process (numpy, Python's own floats). Every session (prediction's, with a thread per core;
    frozen-feature extraction's, with torch's thread count) takes its settings from `inference.session_options`."""
    import io

    from catdog.runtime.inference import session_options

    options = session_options(threads)
    assert options.intra_op_num_threads >= 1 and (threads is None or options.intra_op_num_threads == threads)
    buffer = io.BytesIO()
    torch.onnx.export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.zeros(1, 3, 8, 8), buffer,
                      dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 8, 8), np.float32)})
    smallest_subnormal = np.nextafter(0.0, 1.0)
    assert smallest_subnormal * 1.0 > 0.0
    assert np.float32(1e-40) * np.float32(1.0) > 0.0


def test_weights_float16_holds_exactly_are_stored_as_float16_and_compute_the_same():
    # The out-of-distribution bank is float16 in the run; the exporter writes it out as float32 (half the file).
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(4, 3)).astype(np.float16).astype(np.float32)
    inexact = (rng.normal(size=3) + 1e-4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "bank"], ["product"]), helper.make_node("Add", ["product", "bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(exact, "bank"), numpy_helper.from_array(inexact, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(5, 4)).astype(np.float32)

    def run(proto):
        return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    export_module.store_exact_half_precision(model, min_elements=1)
    onnx.checker.check_model(model)
    stored = {initializer.name: initializer.data_type for initializer in model.graph.initializer}
    assert stored == {"bias": TensorProto.FLOAT, "bank.float16": TensorProto.FLOAT16}
    np.testing.assert_array_equal(run(model), before)


def test_the_builtin_models_cached_file_changes_with_its_preprocessing(monkeypatch, tmp_path):
    """A cached export of the built-in model made before a preprocessing change (say, the noise filter) is not the
    file predict and serve then use: the cached file's name carries the preprocessing's digest."""
    from dataclasses import replace

    from catdog.training.models import zero_training_preprocess

    written = []
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(export_module, "load_exportable", lambda run: (None, None))
    monkeypatch.setattr(export_module, "write_model_file", lambda network, meta, path: (written.append(path), path.touch()))
    first = builtin_model_file(tmp_path)
    assert builtin_model_file(tmp_path) == first and written == [first]  # made once, then reused
    monkeypatch.setattr(export_module, "zero_training_preprocess", lambda: replace(zero_training_preprocess(), denoise_above=DENOISE_ABOVE))
    second = builtin_model_file(tmp_path)
    assert second != first and written == [first, second]
