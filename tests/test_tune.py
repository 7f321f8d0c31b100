"""Optuna tuning on cached features: trials run, bad ones are pruned, the best config trains."""

from __future__ import annotations

import argparse
import csv

from conftest import make_kaggle_folder

from catdog.config import config_from_arguments
from catdog.train import TrainConfig
from catdog.tune import TuneConfig, run_tuning


def test_tuning_writes_a_usable_best_config(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    summary = run_tuning(TuneConfig(data=str(data), out=str(tmp_path / "tune"), preset="fast", trials=12, max_epochs=8,
                                    progress=False), log=lambda _: None)
    assert summary["trials"] == 12 and summary["pruned"] + summary["completed"] == 12
    assert summary["pruned"] >= 1  # the median pruner stops some of the twelve
    assert 0 < summary["best_val_loss"] < 0.69  # better than chance on an easy problem
    rows = list(csv.DictReader(open(tmp_path / "tune" / "trials.csv")))
    assert len(rows) == 12
    arguments = argparse.Namespace(data=str(data), out=str(tmp_path / "run"))
    config = config_from_arguments(TrainConfig, arguments, str(tmp_path / "tune" / "best_config.yaml"))
    assert config.lr == summary["best_params"]["lr"] and config.batch_size == summary["best_params"]["batch_size"]
    assert config.strategy == "head" and config.model == "efficientnet_lite0"
