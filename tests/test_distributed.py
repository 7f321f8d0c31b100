"""Several processes with torchrun on a CPU (gloo): fine-tuning, its resume, the head strategy, sharded predict.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2` (torchrun; --standalone picks
a free port) as its own process group and kills that group whatever happens, so no worker outlives a test.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_image, make_kaggle_folder
from safetensors.torch import load_file

from catdog.training.checkpoint import load_model, load_training_state

from catdog.runtime.runs import LAST_CHECKPOINT_FILE
from catdog.training.datasets import ImageFileDataset, collate_skipping_bad_images
from catdog.model_files import open_model
from catdog.runtime.predict import PredictConfig, run_predict
from catdog.training.train import TrainConfig, train
from catdog.training.finetune import GlobalBatchSampler
from catdog.training.loop import predict_logits
from catdog.runtime.transforms import eval_transform

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
SOURCE = TESTS.parent / "src"


def run_in_own_process_group(command: list[str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `command` (stdout and stderr together) in a new process group, killed as a whole afterwards."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1", "CATDOG_DIST_TIMEOUT_MINUTES": "3"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=cwd, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def torchrun(arguments: list[str]) -> subprocess.CompletedProcess:
    """Two CPU workers under torchrun."""
    return run_in_own_process_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                     "2", *arguments])


def read_records(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def finetune_arguments(data: Path, run: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), "--model", "simple_cnn", "--strategy", "finetune",
            "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--image-size", "32", "--num-workers", "0",
            "--no-progress", "--early-stopping", "0", "--seed", "3", "--no-calibrate"]


def check_trained_on_disjoint_shares(records: list[list[dict]], epoch, train_paths: set[str]) -> None:
    trained = [{r["load"] for r in rank_records if r.get("epoch") == epoch and r.get("load") in train_paths}
               for rank_records in records]
    assert trained[0] and trained[1] and not trained[0] & trained[1]


def check_validated_each_image_once(records: list[list[dict]], epoch, val_paths: list[str]) -> None:
    validated = Counter(r["load"] for rank_records in records for r in rank_records
                        if r.get("epoch") == epoch and r.get("load") in val_paths)
    assert validated == Counter(val_paths)


def check_identical_parameters(records: list[list[dict]], epoch) -> None:
    files = [[r["params"] for r in rank_records if r.get("epoch") == epoch and "params" in r] for rank_records in records]
    assert len(files[0]) == len(files[1]) == 1
    first, second = load_file(files[0][0]), load_file(files[1][0])
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("images", [70, 5])
def test_global_batch_sampler_gives_each_rank_its_slice_of_the_one_process_batches(images):
    dataset = list(range(images))
    one = list(GlobalBatchSampler(dataset, 1, 0, seed=7, global_batch=16))
    shares = [list(GlobalBatchSampler(dataset, 2, rank, seed=7, global_batch=16)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) > 0 and not set(shares[0]) & set(shares[1])
    if images > 16:  # whole global batches: step k of both ranks together is step k of one process
        assert len(one) == 64
        for step in range(4):
            assert shares[0][8 * step : 8 * step + 8] + shares[1][8 * step : 8 * step + 8] == one[16 * step : 16 * step + 16]
    else:  # one batch, split evenly
        assert len(one) == 5 and len(shares[0]) == 2 and set(shares[0] + shares[1]) < set(one)
    sampler = GlobalBatchSampler(dataset, 2, 0, seed=7, global_batch=16)
    sampler.set_epoch(1)
    assert list(sampler) != shares[0]  # reshuffled per epoch


def test_two_process_finetune_killed_after_an_epoch_resumes_and_finishes(tmp_path):
    data = make_kaggle_folder(tmp_path / "data", per_class=12)
    colour_image(0, seed=77).save(data / "cat.77.jpg")  # 13 cats: an odd number of validation images below
    run, first_records, second_records = tmp_path / "run", tmp_path / "records-1", tmp_path / "records-2"
    probe = str(TESTS / "distributed_probe.py")

    killed = torchrun([probe, str(first_records), "--die-after-epoch", "1", "--", *finetune_arguments(data, run)])
    assert killed.returncode != 0, killed.stdout
    assert load_training_state(run / LAST_CHECKPOINT_FILE)["epoch"] == 0
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 1
    first_history = (run / "history.csv").read_text().splitlines()[1]

    resumed = torchrun([probe, str(second_records), "--", "train", "--resume", str(run), "--no-progress"])
    assert resumed.returncode == 0, resumed.stdout
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert (run / "history.csv").read_text().splitlines()[1] == first_history

    split = json.loads((run / "split.json").read_text())
    root = Path(split["root"])
    train_paths = {str(root / name) for name in split["train"]}
    val_paths = [str(root / name) for name in split["val"]]
    assert len(val_paths) % 2 == 1  # a padded share would have to repeat one
    first = [read_records(first_records, rank) for rank in (0, 1)]
    second = [read_records(second_records, rank) for rank in (0, 1)]
    check_trained_on_disjoint_shares(first, 0, train_paths)
    check_trained_on_disjoint_shares(second, 1, train_paths)
    for records, epoch in ((first, 0), (second, 1), (second, "final")):
        check_validated_each_image_once(records, epoch, val_paths)
    # Both ranks of the resumed run started at the second epoch, from the same checkpoint: their parameters (and
    # so their optimizer states) agree after it.
    assert not any(r.get("epoch") == 0 for rank_records in second for r in rank_records)
    check_identical_parameters(first, 0)
    check_identical_parameters(second, 1)

    # Only rank 0 wrote files, TensorBoard's event files included (named after the writing process).
    for records in (first, second):
        assert not [r for r in records[1] if "replace" in r and Path(r["replace"]).is_relative_to(run)]
        assert {"config.json", "split.json", "history.csv", LAST_CHECKPOINT_FILE} <= {
            Path(r["replace"]).name for r in records[0] if "replace" in r}
    rank0_pids = {str(r["pid"]) for records in (first, second) for r in records[0] if "pid" in r}
    event_files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files and all(file.name.split(".")[-2] in rank0_pids for file in event_files)

    # The recorded validation figures are those of each validation image once: recompute them in this process.
    model, meta = load_model(run)
    dataset = ImageFileDataset([Path(p) for p in val_paths], [split["class_names"].index(Path(p).name.split(".")[0])
                                                               for p in val_paths], eval_transform(meta.preprocess))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_skipping_bad_images)
    logits, labels, _, _ = predict_logits(model, loader, torch.device("cpu"))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    log_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert meta.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert meta.metrics["log_loss"] == pytest.approx(log_loss, abs=1e-4)


def test_two_process_head_run_computes_each_feature_once_and_gives_the_one_process_model(tmp_path):
    data = make_kaggle_folder(tmp_path / "data", per_class=8, size=(40, 32))
    options = ["--model", "efficientnet_lite0", "--strategy", "head", "--epochs", "3", "--image-size", "64",
               "--num-workers", "0", "--no-progress"]
    two_cache, one_cache = tmp_path / "cache-2", tmp_path / "cache-1"
    launched = torchrun(["-m", "catdog", "--", "train", "--data", str(data), "--out", str(tmp_path / "run-2"),
                         "--cache-dir", str(two_cache), *options])
    assert launched.returncode == 0, launched.stdout

    # Each rank wrote one cache shard per view; the shards are disjoint and cover every photo.
    for view_folder in (two_cache / "features").iterdir():
        shards = sorted(view_folder.glob("shard-*.safetensors"))
        assert len(shards) == 2 and len({shard.stem.split("-")[-1] for shard in shards}) == 2
        keys = [set(json.loads(load_file(str(shard))["keys_json"].numpy().tobytes())) for shard in shards]
        assert keys[0] and keys[1] and not keys[0] & keys[1] and len(keys[0] | keys[1]) == 16

    (one_cache / "onnx").mkdir(parents=True)  # the same ONNX backbone, without exporting it again
    for onnx_file in (two_cache / "onnx").iterdir():
        (one_cache / "onnx" / onnx_file.name).write_bytes(onnx_file.read_bytes())
    config = TrainConfig(data=str(data), out=str(tmp_path / "run-1"), model="efficientnet_lite0", strategy="head",
                         epochs=3, image_size=64, num_workers=0, progress=False, cache_dir=str(one_cache))
    train(config, log=lambda message: None)
    one, two = load_file(str(tmp_path / "run-1" / "model.safetensors")), load_file(str(tmp_path / "run-2" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    assert json.loads((tmp_path / "run-1" / "meta.json").read_text()) == json.loads((tmp_path / "run-2" / "meta.json").read_text())


def read_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(open(path)))


def test_sharded_predict_writes_the_one_process_csvs(tmp_path):
    data = make_kaggle_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), model="simple_cnn", strategy="finetune", epochs=1, batch_size=8,
                      image_size=32, num_workers=0, progress=False, seed=1), log=lambda message: None)
    inputs = make_kaggle_folder(tmp_path / "inputs", per_class=11, size=(70, 50))
    (inputs / "cat.broken.jpg").write_bytes(b"not a jpeg")
    (inputs / "dog.empty.jpg").write_bytes(b"")
    missing = str(tmp_path / "missing.jpg")

    assert run_predict(PredictConfig(paths=[str(inputs), missing], run=str(run), output=str(tmp_path / "one.csv"),
                                     progress=False), open_model(run=str(run)), log=lambda message: None) == 3
    launched = torchrun(["-m", "catdog", "--", "predict", "--run", str(run), str(inputs), missing,
                         "--output", str(tmp_path / "two.csv"), "--no-progress"])
    assert "2 processes" in launched.stdout and "failed" in launched.stdout, launched.stdout

    one, two = read_rows(tmp_path / "one.csv"), read_rows(tmp_path / "two.csv")
    assert len(one) == 23 and [row[:2] for row in two] == [row[:2] for row in one]
    # every numeric column (probabilities and ood_score); the in_distribution decisions equal
    assert [row[-1] for row in two] == [row[-1] for row in one]
    assert np.allclose(np.array([row[2:-1] for row in two[1:]], float), np.array([row[2:-1] for row in one[1:]], float),
                       atol=1e-6, rtol=0)
    assert read_rows(tmp_path / "two.errors.csv") == read_rows(tmp_path / "one.errors.csv")
    assert len(read_rows(tmp_path / "one.errors.csv")) == 4


def test_gpu_benchmark_smoke_setting_prints_its_table(tmp_path):
    """The GPU benchmark's tiny CPU setting, so the script cannot rot between GPU machines."""
    finished = run_in_own_process_group([sys.executable, str(TESTS.parent / "benchmarks" / "gpu_benchmark.py"), "--smoke"],
                                        cwd=tmp_path)
    output = finished.stdout
    assert finished.returncode == 0, output
    table = [line for line in output.splitlines() if line.startswith("| ")]
    measures = [line.split("|")[1].strip() for line in table[1:]]
    assert measures[0] == "finetune, 1 device, fp32" and "DDP, 2 processes" in measures
    assert any(m.startswith("accuracy in") for m in measures) and "head extraction, 1 device" in measures
    assert "predict, 1 device" in measures
    assert all(re.search(r"[0-9.]+ img/s|val accuracy [0-9.]+", line) for line in table[1:])
