"""predict at the terminal: one line per file for a few files, and `--output -` (CSV on standard output, every
message on standard error), both through a real `catdog` process."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import colour_image, make_kaggle_folder

from catdog.runtime.predict import PRINT_EACH_FILE_UP_TO
from catdog.training.train import TrainConfig, train

SOURCE = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict-output")
    data = make_kaggle_folder(root / "train", per_class=8)
    config = TrainConfig(data=str(data), out=str(root / "run"), model="simple_cnn", strategy="finetune", epochs=1,
                         batch_size=8, image_size=32, num_workers=0, progress=False, early_stopping=0, calibrate=False)
    train(config, log=lambda _: None)
    return root / "run"


def run_catdog(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """`catdog` as a user runs it: a fresh process, importing this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "catdog.cli", *arguments], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo-{index:02d}.jpg"
        colour_image(index % 2, 700 + index).save(path)
        paths.append(path)
    return paths


def read_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def model_options(source: str, request) -> list[str]:
    """--run RUN on PyTorch, or --model FILE (ONNX Runtime, what a runtime-only install runs)."""
    if source == "run":
        return ["--run", str(request.getfixturevalue("tiny_run")), "--backend", "torch"]
    return ["--model", str(request.getfixturevalue("tiny_model_file"))]


@pytest.fixture(scope="module")
def tiny_model_file(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported to one deployable file."""
    out = tmp_path_factory.mktemp("predict-output-model") / "model.onnx"
    result = run_catdog("export", "--run", str(tiny_run), "--out", str(out), "--parity-images", "4", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("source", ["run", "model"])
def test_a_few_files_print_one_line_each_besides_the_csv(source, request, tmp_path):
    paths = photos(tmp_path / "few", 3)
    result = run_catdog("predict", *map(str, paths), *model_options(source, request), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows((tmp_path / "predictions.csv").read_text())
    assert [row["path"] for row in rows] == [str(path) for path in paths]
    printed = [line.split(maxsplit=1) for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    # A photo unlike the training photos says "neither" with its nearest class; the others, label and confidence.
    assert [(path, said.strip()) for path, said in printed] == [
        (row["path"], f"{row['label']}  {float(row['confidence']):.3f}" if row["in_distribution"] == "true" else
         f"neither: unlike the training photos (nearest: {row['label']} {float(row['confidence']):.3f})") for row in rows]


def test_many_files_print_no_line_per_file(tiny_run, tmp_path):
    photos(tmp_path / "many", PRINT_EACH_FILE_UP_TO + 1)
    result = run_catdog("predict", "many", "--run", str(tiny_run), "--backend", "torch", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_rows((tmp_path / "predictions.csv").read_text())) == PRINT_EACH_FILE_UP_TO + 1
    assert "photo-" not in result.stdout and "wrote 21 predictions" in result.stdout


@pytest.mark.parametrize("source", ["run", "model"])
def test_output_dash_writes_the_csv_to_stdout_and_messages_to_stderr(source, request, tmp_path):
    paths = photos(tmp_path / "in", 4)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_catdog("predict", "in", *model_options(source, request), "--output", "-", cwd=tmp_path)
    assert result.returncode == 3, result.stderr  # one unreadable file
    rows = read_rows(result.stdout)  # standard output is exactly the CSV: header and one row per readable photo
    assert list(rows[0]) == ["path", "label", "confidence", "prob_cat", "prob_dog", "ood_score", "in_distribution"]
    assert sorted(Path(row["path"]).name for row in rows) == sorted(path.name for path in paths)
    assert "predicting 5 images" in result.stderr and "broken.jpg" in result.stderr
    assert "100%" in result.stderr  # the progress bar
    assert not (tmp_path / "predictions.csv").exists() and not list(tmp_path.glob("*.errors.csv"))
