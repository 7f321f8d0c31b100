"""Optuna tuning: trials run and are pruned, the best config trains, the SQLite study persists across runs, and a
trial whose worker stopped sending heartbeats is failed and retried."""

from __future__ import annotations

import argparse
import csv
import time

import pytest
from conftest import make_kaggle_folder

from catdog.runtime.options import config_from_arguments
from catdog.training.train import TrainConfig
from catdog.training.tune import TuneConfig, open_study, run_tuning, sqlalchemy_url

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quiet(_):
    pass


@pytest.mark.slow
def test_tuning_writes_a_usable_best_config_and_plots(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    summary = run_tuning(TuneConfig(data=str(data), out=str(tmp_path / "tune"), preset="fast", trials=12, max_epochs=8,
                                    progress=False), log=quiet)
    assert summary["trials"] == 12 and summary["pruned"] + summary["completed"] == 12
    assert summary["pruned"] >= 1  # the median pruner stops some of the twelve
    assert 0 < summary["best_val_loss"] < 0.69  # better than chance on an easy problem
    rows = list(csv.DictReader(open(tmp_path / "tune" / "trials.csv")))
    assert len(rows) == 12
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "tune" / plot).read_bytes().startswith(PNG_SIGNATURE)
    arguments = argparse.Namespace(data=str(data), out=str(tmp_path / "run"))
    config = config_from_arguments(TrainConfig, arguments, str(tmp_path / "tune" / "best_config.yaml"))
    assert config.lr == summary["best_params"]["lr"] and config.batch_size == summary["best_params"]["batch_size"]
    assert config.strategy == "head" and config.model == "efficientnet_lite0"


@pytest.mark.slow
def test_running_tune_again_continues_the_sqlite_study(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    config = TuneConfig(data=str(data), out=str(tmp_path / "tune"), preset="fast", trials=3, max_epochs=4, progress=False)
    assert config.storage == f"sqlite:///{(tmp_path / 'tune' / 'study.db').resolve()}"
    first = run_tuning(config, log=quiet)
    second = run_tuning(TuneConfig(data=str(data), out=str(tmp_path / "tune"), preset="fast", trials=2, max_epochs=4,
                                   progress=False), log=quiet)
    assert (first["trials"], second["trials"]) == (3, 5)
    rows = list(csv.DictReader(open(tmp_path / "tune" / "trials.csv")))
    assert [int(row["number"]) for row in rows] == [0, 1, 2, 3, 4]
    # A new study's first trial is catdog train's own head settings (max_epochs caps the epochs).
    assert (float(rows[0]["lr"]), int(rows[0]["batch_size"]), int(rows[0]["epochs"])) == (3e-3, 256, 4)
    assert second["best_val_loss"] <= first["best_val_loss"]  # the study's best can only improve
    # The continuation draws new parameters instead of replaying the first run's proposals.
    assert len({row["lr"] for row in rows}) == 5


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_trial_of_a_dead_worker_is_failed_and_retried(tmp_path):
    """A worker that started a trial and died stops sending heartbeats; the next worker fails that trial after the
    grace period (twice the heartbeat) and runs it again with the same parameters."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    config = TuneConfig(data=str(data), out=str(tmp_path / "tune"), preset="fast", trials=1, max_epochs=4,
                        heartbeat=1, progress=False)
    study = open_study(config)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna notes that ask() outside optimize() sends none
        dead = study.ask()
    dead_params = {"lr": dead.suggest_float("lr", 1e-4, 3e-2, log=True), "batch_size": dead.suggest_categorical("batch_size", [64, 128, 256, 512])}
    study._storage.record_heartbeat(dead._trial_id)  # its last sign of life, as the heartbeat thread would send
    # Longer than the 2 s grace period by a whole second: SQLite's CURRENT_TIMESTAMP, which Optuna compares, counts
    # whole seconds, so 2.5 s can read as 2 (not stale yet; the failure CI showed).
    time.sleep(3.5)
    run_tuning(config, log=quiet)
    trials = optuna.load_study(study_name=config.study, storage=config.storage).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert {key: retried[0].params[key] for key in dead_params} == dead_params


def test_postgresql_urls_use_psycopg_3():
    assert sqlalchemy_url("postgresql://u:p@db:5432/catdog") == "postgresql+psycopg://u:p@db:5432/catdog"
    assert sqlalchemy_url("postgres://db/catdog") == "postgresql+psycopg://db/catdog"
    assert sqlalchemy_url("postgresql+psycopg://db/x") == "postgresql+psycopg://db/x"
    assert sqlalchemy_url("sqlite:///runs/study.db") == "sqlite:///runs/study.db"


def test_unreachable_storage_is_a_clear_error(tmp_path, capsys):
    from catdog.cli import main

    data = make_kaggle_folder(tmp_path / "train", per_class=2)
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    code = main(["tune", "--data", str(data), "--out", str(tmp_path / "tune"),
                 "--storage", "postgresql://catdog:secret@127.0.0.1:1/catdog"])
    assert code == 1
    message = capsys.readouterr().err
    assert "cannot open the study storage postgresql+psycopg://catdog:***@127.0.0.1:1/catdog" in message
    assert "secret" not in message


def test_unfreeze_trains_the_last_fraction_of_the_backbone():
    from catdog.training.models import create_model
    from catdog.training.finetune import unfreeze_backbone

    model = create_model("simple_cnn", 2)
    total = sum(p.numel() for p in model.backbone.parameters())
    for fraction in (0.0, 0.25, 0.5, 1.0):
        unfreeze_backbone(model, fraction)
        flags = [p.requires_grad for p in model.backbone.parameters()]
        trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
        assert flags == sorted(flags)  # a frozen prefix, then a trainable suffix
        assert fraction * total <= trainable <= max(fraction * total, 1) + max(p.numel() for p in model.backbone.parameters())
        assert model.backbone_frozen == (fraction == 0)
        assert all(p.requires_grad for p in model.head.parameters())


def test_augmentation_strength_runs_from_none_to_the_tutorials_recipe():
    from catdog.training.finetune import augmentation_of_strength
    from catdog.training.augmentation import Augmentation

    assert augmentation_of_strength(1.0) == Augmentation()
    none = augmentation_of_strength(0.0)
    assert none.crop_scale == (1.0, 1.0) and none.flip == 0 and none.rotation_degrees == 0 and not any(none.color_jitter)


@pytest.mark.slow
def test_finetune_tuning_searches_unfreeze_augmentation_and_size_and_its_config_trains(tmp_path):
    from catdog.training.train import train

    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    summary = run_tuning(TuneConfig(data=str(data), out=str(tmp_path / "tune"), strategy="finetune", model="simple_cnn",
                                    trials=3, max_epochs=2, image_sizes=[32, 48], num_workers=0, progress=False), log=quiet)
    assert summary["trials"] == 3 and summary["completed"] >= 1
    assert set(summary["best_params"]) == {"lr", "weight_decay", "unfreeze", "augmentation", "image_size"}
    assert summary["best_params"]["image_size"] in (32, 48) and summary["best_params"]["unfreeze"] in (0.0, 0.25, 0.5, 1.0)
    arguments = argparse.Namespace(data=str(data), out=str(tmp_path / "run"), progress=False, num_workers=0)
    config = config_from_arguments(TrainConfig, arguments, str(tmp_path / "tune" / "best_config.yaml"))
    assert (config.strategy, config.epochs, config.unfreeze) == ("finetune", 2, summary["best_params"]["unfreeze"])
    result = train(config, log=quiet)
    assert result.meta.preprocess.input_size == summary["best_params"]["image_size"]
