"""The runtime install (issue 18): `pip install catdog` without extras predicts and serves from an exported ONNX file
alone, without torch, and answers the same as the full install.

A fresh virtual environment in a temporary folder gets the project from this checkout the way the Dockerfile's
image does: the files the image's build context holds (pyproject.toml, README.md, src/) copied to a temporary
folder, then `python -m pip install <that folder>` (no extras; pip may use its cache and needs an index for the
dependencies). Copying keeps pip's in-tree build (its build/ and egg-info) out of the shared checkout, and a stale
build/lib from an older tree out of the wheel. In that environment:

- `import torch` fails, and the environment takes at most RUNTIME_BUDGET_MB on disk (printed);
- `catdog predict --model model.onnx` on a few generated photos writes the same CSV as this environment's (the
  full install's) `catdog predict`, probabilities within 1e-5; model.onnx is exported here from a tiny trained run;
- `catdog serve --model model.onnx` on a free loopback port answers /ready, /predict and / (stopped in a finally);
- `catdog train` exits 2 with one line naming `catdog[train]`, no traceback; a failing `catdog predict` (no such
  photo) says why without a traceback.

Skipped, saying why, only when pip cannot reach a package index.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import colour_image, make_kaggle_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
RUNTIME_BUDGET_MB = 300
TOLERANCE = 1e-5
# What pip prints when it cannot reach an index (as opposed to a real resolution or build failure).
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
               "Could not fetch URL", "connection broken by", "Max retries exceeded")


def disk_usage_mb(folder: Path) -> float:
    """What `du -s` counts: allocated blocks, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(folder):
        for name in [".", *files]:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total / 2**20


def clean_environment(cache: Path, bin_folder: Path | None = None, source: bool = False) -> dict[str, str]:
    """The environment for a child process: no PYTHONPATH or VIRTUAL_ENV inherited, a private catdog cache; this
    checkout's sources first on the path for the full install (`source`), the venv's bin first for the runtime."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["CATDOG_CACHE"] = str(cache)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if source:
        env["PYTHONPATH"] = str(SOURCE)
    if bin_folder is not None:
        env["PATH"] = os.pathsep.join([str(bin_folder), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(bin_folder.parent)
    return env


def copy_build_context(destination: Path) -> Path:
    """The files the Dockerfile's build context holds (see .dockerignore): enough for `pip install`."""
    destination.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    shutil.copytree(SOURCE, destination / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return destination


class Runtime:
    """The runtime-only virtual environment."""

    def __init__(self, folder: Path, cache: Path):
        self.folder = folder
        self.bin = folder / "bin"
        self.python = self.bin / "python"
        self.catdog = self.bin / "catdog"
        self.env = clean_environment(cache, bin_folder=self.bin)

    def run(self, *command: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(part) for part in command], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime-install")


@pytest.fixture(scope="module")
def runtime(work) -> Runtime:
    context = copy_build_context(work / "context")
    folder = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=300,
                   env=clean_environment(work / "cache"))
    environment = Runtime(folder, work / "cache")
    result = environment.run(environment.python, "-m", "pip", "install", context, cwd=work, timeout=1800)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(sign in output for sign in UNREACHABLE):
            pytest.skip(f"pip cannot reach a package index to install the runtime's dependencies:\n{output[-2000:]}")
        pytest.fail(f"`pip install {context}` (no extras) failed ({result.returncode}):\n{output[-6000:]}")
    return environment


@pytest.fixture(scope="module")
def model_file(work) -> Path:
    """model.onnx exported by the full install (this environment) from a tiny run trained here."""
    from catdog.training.train import TrainConfig, train

    data = make_kaggle_folder(work / "train", per_class=8)
    run = work / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CATDOG_CACHE", str(work / "cache"))
        train(TrainConfig(data=str(data), out=str(run), model="simple_cnn", strategy="finetune", epochs=1,
                          batch_size=8, image_size=32, num_workers=0, progress=False, early_stopping=0,
                          calibrate=False), log=lambda _: None)
    model = work / "model.onnx"
    result = subprocess.run([sys.executable, "-m", "catdog.cli", "export", "--run", str(run), "--format", "onnx",
                             "--out", str(model)], cwd=work, env=clean_environment(work / "cache", source=True),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and model.is_file(), f"export failed ({result.returncode}):\n{result.stderr}"
    return model


@pytest.fixture(scope="module")
def photo_paths(work) -> list[Path]:
    folder = work / "photos"
    folder.mkdir()
    paths = []
    for index, (size, suffix) in enumerate([((64, 48), ".jpg"), ((48, 64), ".jpg"), ((300, 200), ".png"),
                                            ((33, 97), ".jpg"), ((640, 480), ".jpg")]):
        path = folder / f"photo-{index}{suffix}"
        colour_image(index % 2, 4200 + index, size).save(path)
        paths.append(path)
    return paths


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


# --- the environment ----------------------------------------------------------------------------------------------

def test_the_runtime_has_no_torch_and_is_small(runtime, work, capsys):
    result = runtime.run(runtime.python, "-c", "import torch", cwd=work)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stdout + result.stderr
    for library in ("torchvision", "timm", "sklearn", "matplotlib", "optuna", "onnx"):
        found = runtime.run(runtime.python, "-c", f"import importlib.util, sys; "
                            f"sys.exit(importlib.util.find_spec({library!r}) is not None)", cwd=work)
        assert found.returncode == 0, f"{library} is installed in the runtime environment"
    result = runtime.run(runtime.python, "-c", "import catdog, importlib.metadata as m; "
                         "print(catdog.__file__); print(catdog.__version__, m.version('catdog'))", cwd=work)
    assert result.returncode == 0, result.stderr
    location, versions = result.stdout.split("\n")[:2]
    assert Path(location).resolve().is_relative_to(runtime.folder.resolve()), location  # not this checkout
    module_version, installed_version = versions.split()
    assert module_version == installed_version, "catdog.__version__ and pyproject.toml's version differ"
    size = disk_usage_mb(runtime.folder)
    with capsys.disabled():
        print(f"\nruntime virtual environment: {size:.0f} MB on disk ({runtime.folder}; budget {RUNTIME_BUDGET_MB} MB)")
    assert size <= RUNTIME_BUDGET_MB, f"the runtime environment takes {size:.0f} MB (budget {RUNTIME_BUDGET_MB} MB)"


def test_a_command_of_a_missing_extra_exits_2_naming_the_extra(runtime, work):
    result = runtime.run(runtime.catdog, "train", "--data", "x", cwd=work)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "catdog[train]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- predict ------------------------------------------------------------------------------------------------------

def test_a_failing_predict_says_why_without_a_traceback(runtime, model_file, work):
    """An ordinary failure (nothing to predict) is reported as in the full install: the runtime's error handling
    must not reach for a training module."""
    result = runtime.run(runtime.catdog, "predict", "--model", model_file, work / "no-such-photo.jpg", cwd=work)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "no-such-photo.jpg" in result.stderr + result.stdout, result.stderr


def test_predict_matches_the_full_install(runtime, model_file, photo_paths, work):
    full_csv, runtime_csv = work / "full.csv", work / "runtime.csv"
    full = subprocess.run([sys.executable, "-m", "catdog.cli", "predict", "--model", str(model_file),
                           *map(str, photo_paths), "--output", str(full_csv)], cwd=work,
                          env=clean_environment(work / "cache", source=True), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, f"full install: {full.stderr}"
    light = runtime.run(runtime.catdog, "predict", "--model", model_file, *photo_paths, "--output", runtime_csv,
                        cwd=work)
    assert light.returncode == 0, f"runtime install: {light.stderr}"

    full_header, full_rows = read_csv(full_csv)
    light_header, light_rows = read_csv(runtime_csv)
    assert light_header == full_header
    assert full_header[:3] == ["path", "label", "confidence"] and len(full_header) >= 5
    assert all(name.startswith("prob_") for name in full_header[3:-2])
    assert full_header[-2:] == ["ood_score", "in_distribution"]
    assert [row["path"] for row in light_rows] == [row["path"] for row in full_rows] == [str(p) for p in photo_paths]
    for full_row, light_row in zip(full_rows, light_rows):
        assert light_row["label"] == full_row["label"], (full_row, light_row)
        assert light_row["in_distribution"] == full_row["in_distribution"], (full_row, light_row)
        for column in full_header[2:-1]:  # confidence, the probabilities and the out-of-distribution score
            assert abs(float(light_row[column]) - float(full_row[column])) <= TOLERANCE, (column, full_row, light_row)


# --- serve --------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def multipart(path: Path, field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_serve_answers_ready_predict_and_the_page(runtime, model_file, photo_paths, work):
    port = free_port()
    log_path = work / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(runtime.catdog), "serve", "--model", str(model_file), "--port", str(port)],
                                  cwd=work, env=runtime.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        readiness = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status, _, body = request(port, "GET", "/ready")
                if status == 200:
                    readiness = json.loads(body)
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert readiness is not None, f"no 200 from /ready (exit {server.poll()}):\n{log_path.read_text()[-4000:]}"
        assert readiness["ready"] is True, readiness

        body, content_type = multipart(photo_paths[0])
        status, kind, answer = request(port, "POST", "/predict", body, {"Content-Type": content_type})
        assert status == 200 and kind.startswith("application/json"), (status, answer[:500])
        prediction = json.loads(answer)
        assert set(prediction) >= {"label", "confidence", "probabilities"}, prediction
        probabilities = prediction["probabilities"]
        assert abs(sum(probabilities.values()) - 1) < 1e-4 and prediction["label"] in probabilities
        assert prediction["confidence"] == pytest.approx(max(probabilities.values()), abs=1e-6)
        assert prediction["label"] == max(probabilities, key=probabilities.get)
        predicted = work / "runtime.csv"  # written by test_predict_matches_the_full_install, when it ran
        if predicted.is_file():
            row = next(row for row in read_csv(predicted)[1] if row["path"] == str(photo_paths[0]))
            assert prediction["label"] == row["label"]
            for name, value in probabilities.items():
                assert value == pytest.approx(float(row[f"prob_{name}"]), abs=1e-4), (name, prediction, row)

        status, kind, page = request(port, "GET", "/")
        assert status == 200 and kind.startswith("text/html") and b"<html" in page.lower(), (status, kind)
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
