"""Export, reload, compare: ONNX and TorchScript files carry class names and preprocessing and match PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import make_kaggle_folder

from catdog import export as export_module
from catdog.checkpoint import load_model
from catdog.cli import main
from catdog.export import ExportConfig, ExportParityError, parity_batch, run_export
from catdog.train import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_kaggle_folder(root / "train", per_class=10)
    train(TrainConfig(data=str(data), out=str(root / "run"), model="efficientnet_lite0", strategy="head", epochs=5,
                      num_workers=0, progress=False, image_size=64), log=lambda _: None)
    return root / "run"


def test_onnx_export_reload_compare(run_dir, tmp_path):
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["class_names"]) == ["cat", "dog"]
    assert json.loads(metadata["preprocess"])["input_size"] == 64
    model, meta = load_model(run_dir)
    batch = parity_batch(run_dir, meta.preprocess, 8)
    assert batch.shape == (4, 3, 64, 64)  # the four real validation images (2 per class of 10)
    (logits,) = session.run(None, {"images": batch.numpy()})
    with torch.inference_mode():
        reference = torch.softmax(model(batch) / meta.temperature, 1).numpy()
    exported = torch.softmax(torch.from_numpy(logits) / float(metadata["temperature"]), 1).numpy()
    assert np.abs(reference - exported).max() <= 1e-4


def test_torchscript_export_carries_metadata(run_dir, tmp_path):
    out = run_export(ExportConfig(run=str(run_dir), format="torchscript", out=str(tmp_path / "m.pt")), log=lambda _: None)
    extra = {"class_names": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["class_names"]) == ["cat", "dog"]
    assert loaded(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_failed_parity_fails_loudly_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportParityError, match="exceeds"):
        run_export(ExportConfig(run=str(run_dir), out=str(tmp_path / "bad.onnx")), log=lambda _: None)
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("options_name", ["prediction", "features"])
def test_onnx_sessions_leave_the_callers_floating_point_alone(options_name):
    """catdog runs ONNX Runtime inside the user's process (the Python API, serve, tests): building and running a
    session must not switch the calling thread to flush-denormals-to-zero, which would change every later float
    operation of that process (numpy, Python's own floats)."""
    import io

    from catdog.features import onnx_session_options

    options = export_module.prediction_session_options() if options_name == "prediction" else onnx_session_options()
    buffer = io.BytesIO()
    torch.onnx.export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.zeros(1, 3, 8, 8), buffer,
                      dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 8, 8), np.float32)})
    smallest_subnormal = np.nextafter(0.0, 1.0)
    assert smallest_subnormal * 1.0 > 0.0
    assert np.float32(1e-40) * np.float32(1.0) > 0.0
