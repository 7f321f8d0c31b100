"""`catdog tune`: an Optuna study over training settings, kept in a database so it outlives the process and can be
shared by several workers.

- Storage: by default a SQLite file in the output folder (`sqlite:///<out>/study.db`), so running the same
  command again continues the same study. A `postgresql://` URL lets `catdog tune` processes on several machines
  work on one study; each worker sends a heartbeat, and a trial whose worker stopped beating (killed, machine
  lost) is marked failed by the next worker and retried with the same parameters (Optuna's RDB storage and
  `RetryFailedTrialCallback`).
- `--strategy head`: the frozen backbone's features are extracted (or read from the cache) once per worker; every
  trial trains only the head on them (learning rate, batch size, weight decay, label smoothing, epochs, optimizer).
- `--strategy finetune`: every trial fine-tunes the network on images for `--max-epochs` epochs (learning rate,
  weight decay, how much of the backbone to unfreeze, augmentation strength, input size).
- Either way each epoch's validation loss is reported, so the median pruner stops unpromising trials early, and
  the best settings are written as a config file that `catdog train --config` takes, next to trials.csv,
  study.json and the optimisation history and parameter importance plots.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from catdog.training.config import TuneConfig
from catdog.training.augmentation import train_transform
from catdog.runtime.data import LabelledImages, default_num_workers, discover, stratified_split
from catdog.training.datasets import ImageFileDataset, dataloader_options
from catdog.training.devices import resolve_device
from catdog.runtime.files import write_csv_atomic, write_json_atomic, write_text_atomic, write_with_atomic
from catdog.training.models import create_model
from catdog.training.plotting import headless_pyplot
from catdog.training.config import TrainConfig
from catdog.training.strategy import resolve_preprocess, strategy_defaults
from catdog.training.finetune import augmentation_of_strength, unfreeze_backbone
from catdog.training.head import FeatureBatches, load_head_data
from catdog.training.loop import (
    build_optimizer,
    build_scheduler,
    epoch_generator,
    evaluate,
    seed_everything,
    train_one_epoch,
)
from catdog.runtime.transforms import eval_transform

# optuna (with sqlalchemy and psycopg) is the `tune` extra: it is imported inside the functions that use it, so
# this module, and with it `catdog tune --help` and TuneConfig, imports without it.


class StudyStorageError(RuntimeError):
    """The study's database cannot be opened (bad URL, server down, wrong password)."""


# ---------------------------------------------------------------- the study's storage


def sqlalchemy_url(url: str) -> str:
    """PostgreSQL URLs go through psycopg 3 (`postgresql+psycopg://`); `postgresql://` and `postgres://` are
    accepted as the same thing. Other URLs (sqlite:///, mysql+pymysql://, ...) pass unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def open_storage(url: str, heartbeat_seconds: int):
    """Optuna's RDB storage with heartbeats: a trial whose worker stopped beating for twice the interval is failed
    by the next worker that starts a trial, and queued again with the same parameters (up to 3 times)."""
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental" since 2.x
        heartbeat = {}
        if heartbeat_seconds:
            heartbeat = {"heartbeat_interval": heartbeat_seconds, "grace_period": 2 * heartbeat_seconds,
                         "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=3)}
        # Workers started together may race to create the schema; the loser sees the tables once the winner commits.
        for attempt in range(4):
            try:
                return optuna.storages.RDBStorage(sqlalchemy_url(url), **heartbeat)
            except sqlalchemy.exc.IntegrityError as error:
                if attempt == 3:
                    raise StudyStorageError(f"cannot open the study storage {_without_password(url)}: {error}") from error
                time.sleep(1 + attempt)
            except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
                raise StudyStorageError(f"cannot open the study storage {_without_password(url)}: {error}") from error


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(sqlalchemy_url(url)).render_as_string(hide_password=True)
    except Exception:  # not even parseable: the raw text is what the user typed
        return url


def open_study(config: TuneConfig):
    """Create the study, or load it when it exists, so a rerun (or another worker) continues it."""
    import optuna

    storage = open_storage(config.storage, config.heartbeat)
    warmup = 3 if config.strategy == "head" else 1
    study = optuna.create_study(study_name=config.study, storage=storage, direction="minimize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup))
    # A fresh sampler seed for each continuation and each worker: a rerun, or two workers started together, must not
    # propose the same parameters again. constant_liar: a worker's proposals steer clear of trials still running.
    seed = (config.seed + 1009 * len(study.trials) + 7919 * os.getpid()) % 2**32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return study


# ---------------------------------------------------------------- objectives


@contextlib.contextmanager
def torch_threads(count: int):
    """Run with `count` intra-op threads, then restore. A linear head on feature vectors does microsecond-sized
    operations, where handing work to a second thread costs more than it saves; on a busy 2-core machine one
    thread trained it 10x faster per step than two (13 against 139 ms, 2026-11-29)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_reporting_each_epoch(trial, epochs: int, train_epoch: Callable[[int], None],
                               validate: Callable[[], tuple]) -> float:
    """A trial's epochs: `train_epoch(epoch)`, then `validate()` (the loop's `evaluate` of the trial's model), whose
    loss is reported so the median pruner can stop the trial early (Optuna's TrialPruned). Returns the best
    validation loss. Both strategies' trials run their epochs through this."""
    import optuna

    best = float("inf")
    for epoch in range(epochs):
        train_epoch(epoch)
        val_loss, val_accuracy, _, _ = validate()
        best = min(best, val_loss)
        trial.set_user_attr("val_accuracy", val_accuracy)
        trial.report(val_loss, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return best


def base_train_config(config: TuneConfig) -> TrainConfig:
    return TrainConfig(data=config.data, out=config.out, preset=config.preset, model=config.model, strategy=config.strategy,
                       seed=config.seed, val_fraction=config.val_fraction, device=config.device,
                       num_workers=config.num_workers, progress=config.progress)


def head_objective(config: TuneConfig, base: TrainConfig, train_images: LabelledImages, val_images: LabelledImages,
                   device: torch.device, log) -> Callable:
    """Trials that train a linear head on the frozen backbone's cached features."""
    import optuna

    def backbone() -> nn.Module:  # built only when some features are not cached yet
        return create_model(base.model, len(train_images.class_names), pretrained=True, freeze_backbone=True).backbone

    data = load_head_data(base, backbone, resolve_preprocess(base, "head"), train_images, val_images, device, log)
    feature_dim, classes = data.train_samples.shape[-1], len(train_images.class_names)
    plain_loss = nn.CrossEntropyLoss()
    val_batches = FeatureBatches(data.val_features, data.val_labels, 1024, shuffle=False)

    def objective(trial: optuna.Trial) -> float:
        with torch_threads(1):
            return train_head_trial(trial)

    def train_head_trial(trial: optuna.Trial) -> float:
        trial_config = replace(
            base,
            lr=trial.suggest_float("lr", 1e-4, 3e-2, log=True),
            batch_size=trial.suggest_categorical("batch_size", [64, 128, 256, 512]),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.1),
            epochs=trial.suggest_int("epochs", min(5, config.max_epochs), config.max_epochs),
            optimizer=trial.suggest_categorical("optimizer", ["adamw", "adam"]),
        )
        seed_everything(config.seed + trial.number)
        head = nn.Linear(feature_dim, classes)
        loss_function = nn.CrossEntropyLoss(label_smoothing=trial_config.label_smoothing)
        optimizer = build_optimizer(head.parameters(), trial_config)
        scheduler = build_scheduler(optimizer, trial_config, math.ceil(len(data.train_labels) / trial_config.batch_size))

        def train_epoch(epoch: int) -> None:
            batches = FeatureBatches(data.train_samples, data.train_labels, trial_config.batch_size, True, config.seed, epoch)
            train_one_epoch(head, batches, optimizer, scheduler, loss_function, torch.device("cpu"), trial_config.grad_clip)

        return train_reporting_each_epoch(trial, trial_config.epochs, train_epoch,
                                          lambda: evaluate(head, val_batches, plain_loss, torch.device("cpu")))

    return objective


UNFREEZE_FRACTIONS = [0.0, 0.25, 0.5, 1.0]


def finetune_image_sizes(config: TuneConfig, base: TrainConfig) -> list[int]:
    """--image-sizes, or the model's own input size and about three quarters of it (a multiple of 32)."""
    if config.image_sizes:
        return sorted(set(config.image_sizes))
    own = resolve_preprocess(replace(base, image_size=0), "finetune").input_size
    return sorted({max(32, round(own * 0.75 / 32) * 32), own})


def finetune_objective(config: TuneConfig, base: TrainConfig, train_images: LabelledImages, val_images: LabelledImages,
                       device: torch.device, log) -> Callable:
    """Trials that fine-tune the network on images, each epoch's validation loss reported for pruning."""
    import optuna

    base = strategy_defaults(base, "finetune")
    image_sizes = finetune_image_sizes(config, base)
    workers = default_num_workers() if config.num_workers < 0 else config.num_workers
    options = dataloader_options(device, workers)
    plain_loss = nn.CrossEntropyLoss()
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    log(f"finetune trials: {config.max_epochs} epochs each, input sizes {image_sizes}, unfreezing {UNFREEZE_FRACTIONS} of the backbone")

    def objective(trial: optuna.Trial) -> float:
        trial_config = replace(
            base,
            lr=trial.suggest_float("lr", 1e-5, 3e-3, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            unfreeze=trial.suggest_categorical("unfreeze", UNFREEZE_FRACTIONS),
            augmentation=trial.suggest_float("augmentation", 0.0, 1.0),
            image_size=trial.suggest_categorical("image_size", image_sizes),
            epochs=config.max_epochs,
        )
        seed_everything(config.seed + trial.number)
        preprocess = resolve_preprocess(trial_config, "finetune")
        model = create_model(base.model, len(train_images.class_names), pretrained=base.pretrained)
        unfreeze_backbone(model, trial_config.unfreeze)
        model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
        train_dataset = ImageFileDataset(train_images.paths, train_images.labels,
                                         train_transform(preprocess, augmentation_of_strength(trial_config.augmentation)),
                                         preprocess.resize_size)
        val_loader = torch.utils.data.DataLoader(
            ImageFileDataset(val_images.paths, val_images.labels, eval_transform(preprocess), preprocess.resize_size),
            batch_size=trial_config.batch_size * 2, shuffle=False, **options)
        optimizer = build_optimizer(model.parameters(), trial_config)
        scheduler = build_scheduler(optimizer, trial_config, math.ceil(len(train_dataset) / trial_config.batch_size))

        def train_epoch(epoch: int) -> None:
            train_loader = torch.utils.data.DataLoader(
                train_dataset, batch_size=trial_config.batch_size, shuffle=True, generator=epoch_generator(config.seed, epoch),
                drop_last=len(train_dataset) > trial_config.batch_size, **options)
            train_one_epoch(model, train_loader, optimizer, scheduler, plain_loss, device, trial_config.grad_clip, amp_dtype)

        return train_reporting_each_epoch(trial, trial_config.epochs, train_epoch,
                                          lambda: evaluate(model, val_loader, plain_loss, device, amp_dtype))

    return objective


def default_trial_params(config: TuneConfig, base: TrainConfig) -> dict:
    """`catdog train`'s own settings, in the search space's terms."""
    defaults = strategy_defaults(base, config.strategy)
    if config.strategy == "head":
        return {"lr": defaults.lr, "batch_size": defaults.batch_size, "weight_decay": defaults.weight_decay,
                "label_smoothing": defaults.label_smoothing, "epochs": min(defaults.epochs, config.max_epochs),
                "optimizer": defaults.optimizer}
    sizes = finetune_image_sizes(config, base)
    own = resolve_preprocess(replace(base, image_size=0), "finetune").input_size
    return {"lr": defaults.lr, "weight_decay": defaults.weight_decay, "unfreeze": defaults.unfreeze,
            "augmentation": defaults.augmentation, "image_size": own if own in sizes else sizes[-1]}


# ---------------------------------------------------------------- the command


def run_tuning(config: TuneConfig, log=print) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = base_train_config(config)
    device = resolve_device(config.device)
    study = open_study(config)
    images = discover(config.data)
    train_indices, val_indices = stratified_split(images.labels, config.val_fraction, config.seed)
    train_images, val_images = images.subset(train_indices), images.subset(val_indices)
    make_objective = head_objective if config.strategy == "head" else finetune_objective
    objective = make_objective(config, base, train_images, val_images, device, log)
    if not study.trials:
        # The first trial tries catdog's defaults, so the study's best is never worse than not tuning at all.
        study.enqueue_trial(default_trial_params(config, base), skip_if_exists=True)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    log(f"study {config.study} in {_without_password(config.storage)}: {len(study.trials)} trials so far; "
        f"this worker ({worker}) runs {config.trials} more")

    def objective_of_this_worker(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        return objective(trial)

    started = time.perf_counter()
    study.optimize(objective_of_this_worker, n_trials=config.trials, timeout=config.timeout * 60 or None)
    summary = write_study_report(study, config, base, time.perf_counter() - started, log)
    return summary


def write_study_report(study, config: TuneConfig, base: TrainConfig, seconds: float, log) -> dict:
    """trials.csv, best_config.yaml, study.json and the two plots, from every trial in the study (all workers')."""
    out = Path(config.out)
    trials = study.trials
    states = [trial.state.name for trial in trials]
    parameter_names = sorted({name for trial in trials for name in trial.params})
    write_csv_atomic(out / "trials.csv", ["number", "state", "val_loss", "worker", *parameter_names],
                     [[t.number, t.state.name, t.value, t.user_attrs.get("worker", ""), *[t.params.get(k) for k in parameter_names]]
                      for t in trials])
    if "COMPLETE" not in states:
        raise ValueError(f"study {config.study}: no trial completed yet ({len(trials)} pruned or failed); run more trials")
    best = {"preset": config.preset, "model": base.model, "strategy": config.strategy, **study.best_params}
    if config.strategy == "finetune":
        best["epochs"] = config.max_epochs  # what every trial trained for
    write_text_atomic(out / "best_config.yaml", "".join(f"{key}: {value}\n" for key, value in best.items()))
    summary = {"study": config.study, "storage": _without_password(config.storage), "best_val_loss": study.best_value,
               "best_params": study.best_params, "best_config": best, "best_trial": study.best_trial.number, "trials": len(trials),
               "completed": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
               "seconds": round(seconds, 1)}
    write_json_atomic(out / "study.json", summary)
    save_study_plots(study, out, log)
    log(f"{summary['trials']} trials in the study ({summary['pruned']} pruned, {summary['failed']} failed), "
        f"{seconds:.1f} s in this worker; best validation loss {study.best_value:.4f} with {study.best_params}")
    log(f"train with them: catdog train --data {config.data} --config {out / 'best_config.yaml'} --out RUN")
    log(f"browse the study: optuna-dashboard {_without_password(config.storage)}")
    return summary


def save_study_plots(study, out: Path, log) -> None:
    """optimization_history.png always; param_importances.png once two trials have completed (fANOVA needs them)."""
    plt = headless_pyplot()  # before optuna's plotting module imports pyplot
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
    completed = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if len(completed) >= 2:
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    else:
        log("param_importances.png needs two completed trials; not written yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib backend's notice
        for name, plot in plots.items():
            figure = plot(study).figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            write_with_atomic(out / name, lambda path: figure.savefig(path, format="png", dpi=110))
            plt.close(figure)
