"""A command imports only what it runs (issue 24), checked in this full install, where torch is there to be imported:

- building the parser and `--help` import the commands' config classes alone, never an implementation;
- the runtime commands (predict, explain, serve) never import torch or the training layer, for `--model FILE` and
  for a run whose model.onnx is current;
- loading a predictor for `--run RUN` computes the run's digest once and reads each of its files once.

Each check runs in a fresh interpreter, so nothing an earlier test imported hides an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import colour_image

from catdog.cli import COMMANDS, DATA_COMMANDS

SOURCE = Path(__file__).resolve().parents[1] / "src"
# What `--help` may load of catdog: the package, the CLI, the runtime's small modules the config classes use, and
# the config modules themselves.
HELP_MAY_LOAD = {"catdog", "catdog.cli", "catdog.runtime", "catdog.runtime.version", "catdog.runtime.options",
                 "catdog.runtime.extras", "catdog.runtime.images", "catdog.runtime.transforms", "catdog.runtime.config",
                 "catdog.training", "catdog.training.config", "catdog.serve", "catdog.serve.config"}
HEAVY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "optuna", "onnx", "fastapi", "onnxruntime")


def run_python(code: str, cwd: Path | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last, which is returned."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300,
                            cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


LOADED = "json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m.startswith('catdog')))"


@pytest.mark.parametrize("words", [[]] + [[name] for name in COMMANDS] + [["data", name] for name in DATA_COMMANDS],
                         ids=lambda words: " ".join(words) or "catdog")
def test_help_imports_no_command_implementation(words):
    loaded = run_python(f"""
import json, sys
from catdog.cli import main
try:
    main({words + ["--help"]!r})
except SystemExit as exit:
    assert exit.code == 0, exit.code
else:
    raise AssertionError("--help did not exit")
print({LOADED.format(heavy=HEAVY)})
""")
    assert set(loaded) <= HELP_MAY_LOAD, sorted(set(loaded) - HELP_MAY_LOAD)


def test_the_help_check_sees_an_implementation_import():
    loaded = run_python(f"import json, sys, catdog.runtime.predict; print({LOADED.format(heavy=HEAVY)})")
    assert "catdog.runtime.predict" in set(loaded) - HELP_MAY_LOAD


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.jpg"
    colour_image(0, 1).save(path)
    return path


def runtime_command_loads(arguments: list[str], cwd: Path) -> set[str]:
    return set(run_python(f"""
import json, sys
from catdog.cli import main
assert main({arguments!r}) == 0
print({LOADED.format(heavy=HEAVY)})
""", cwd))


def test_predict_and_explain_never_import_torch(served_run, photo, tmp_path):
    run, model_file = served_run
    for arguments in (["predict", "--model", str(model_file), str(photo), "--output", str(tmp_path / "a.csv")],
                      ["predict", "--run", str(run), str(photo), "--output", str(tmp_path / "b.csv")],
                      ["explain", "--model", str(model_file), str(photo), "--output", str(tmp_path / "maps")]):
        loaded = runtime_command_loads(arguments, tmp_path)
        assert "catdog.runtime.predict" in loaded and "onnxruntime" in loaded  # it did predict
        assert not {"torch", "torchvision", "timm", "sklearn", "matplotlib"} & loaded, arguments
        assert not [name for name in loaded if name.startswith("catdog.training.") and name != "catdog.training.config"], arguments
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text().replace(str(run / "model.onnx"), str(model_file))


def test_serve_never_imports_torch(served_run, photo):
    """`catdog serve --model F` up to a real answer: the command opens the file, the app's lifespan starts and a
    photo is predicted (through Starlette's test client instead of a socket)."""
    loaded = set(run_python(f"""
import json, sys
import catdog.serve.app as app_module
from fastapi.testclient import TestClient

def serve_one_request(config, predictor=None):
    with TestClient(app_module.create_app(config, predictor)) as client:
        with open({str(photo)!r}, "rb") as image:
            answer = client.post("/predict", files={{"file": ("photo.jpg", image, "image/jpeg")}})
        assert answer.status_code == 200 and answer.json()["label"] in ("cat", "dog"), answer.text

app_module.run_server = serve_one_request
from catdog.cli import main
assert main(["serve", "--model", {str(served_run[1])!r}]) == 0
print({LOADED.format(heavy=HEAVY)})
"""))
    assert "fastapi" in loaded and "onnxruntime" in loaded
    assert not {"torch", "torchvision", "timm", "sklearn", "matplotlib"} & loaded
    assert not [name for name in loaded if name.startswith("catdog.training.") and name != "catdog.training.config"]


COUNT_READS = """
import collections, json, sys
import catdog.runtime.inference as inference
import catdog.runtime.runs as runs
run = {run!r}
opened, sessions, digests = collections.Counter(), collections.Counter(), []

def count_opens(event, arguments):
    if event == "open" and isinstance(arguments[0], (str, bytes)) and str(arguments[0]).startswith(run):
        opened[str(arguments[0])[len(run) + 1:]] += 1

sys.addaudithook(count_opens)
session = inference.OnnxNetwork.__init__

def counted_session(self, path, *rest, **options):
    sessions[str(path)] += 1
    session(self, path, *rest, **options)

inference.OnnxNetwork.__init__ = counted_session
digest = runs.weights_digest

def counted_digest(path):
    digests.append(str(path))
    return digest(path)

runs.weights_digest = counted_digest
import catdog.runtime.model_file as model_file
model_file.weights_digest = counted_digest  # the name open_run looks up
from catdog.model_files import open_model
predictor = open_model(run=run, cache_dir={cache!r})
print(json.dumps({{"opened": opened, "sessions": sessions, "digests": digests, "source": predictor.source}}))
"""


def test_loading_a_run_digests_once_and_reads_each_file_once(served_run, tmp_path):
    run = served_run[0]
    counted = run_python(COUNT_READS.format(run=str(run), cache=str(tmp_path / "cache")))
    assert counted["source"] == str(run / "model.onnx")  # current: the run's own file
    assert len(counted["digests"]) == 1
    assert counted["sessions"] == {str(run / "model.onnx"): 1}
    assert counted["opened"] and all(count == 1 for count in counted["opened"].values()), counted["opened"]
    assert {"meta.json", "model.safetensors"} <= set(counted["opened"])


def test_a_stale_run_is_digested_once_and_its_export_opened_once(served_run, tmp_path):
    """A run without a current model.onnx: the digest is computed once (the export is named by it) and the file
    exported into the cache is the one session opened."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(served_run[0], run)
    (run / "model.onnx").unlink()
    counted = run_python(COUNT_READS.format(run=str(run), cache=str(tmp_path / "cache")))
    assert len(counted["digests"]) == 1
    assert Path(counted["source"]).parent == tmp_path / "cache" / "models"
    assert counted["sessions"] == {counted["source"]: 1}
    assert counted["opened"]["meta.json"] <= 2  # the digest, and the export's own read of the run
