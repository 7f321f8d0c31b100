"""`catdog tune`: Optuna search over the head's learning rate, batch size, weight decay, label smoothing and
epochs, with median pruning of unpromising trials.

The frozen backbone's features are extracted (or read from the cache) once; every trial then trains only the
head on them with the same `train_one_epoch` and `evaluate` as `catdog train`, reporting the validation loss after
each epoch so Optuna can stop bad trials early. The best settings are written as a config file that
`catdog train --config` takes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from catdog.config import option
from catdog.data import discover, stratified_split
from catdog.files import write_csv_atomic, write_json_atomic, write_text_atomic
from catdog.models import create_model
from catdog.train import (
    TrainConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    resolve_device,
    resolve_preprocess,
    seed_everything,
    train_one_epoch,
)
from catdog.train_head import FeatureBatches, load_head_data


@dataclass
class TuneConfig:
    data: str = option("", "data set folder or CSV manifest")
    out: str = option("runs/tune", "folder for trials.csv, best_config.yaml and study.json")
    preset: str = option("default", "preset whose model and flip setting the trials use", choices=("fast", "default"))
    trials: int = option(30, "number of trials")
    timeout: float = option(0.0, "stop starting trials after this many minutes (0: no limit)")
    max_epochs: int = option(40, "largest number of epochs a trial may ask for")
    seed: int = option(42, "seed for the split and the sampler")
    val_fraction: float = option(0.2, "fraction of each class held out for validation")
    progress: bool = option(True, "show progress bars while extracting features")

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data is required")
        if self.trials < 1 or self.max_epochs < 2:
            raise ValueError("--trials must be at least 1 and --max-epochs at least 2")


def run_tuning(config: TuneConfig, log=print) -> dict:
    import optuna

    base = TrainConfig(data=config.data, out=config.out, preset=config.preset, strategy="head", seed=config.seed,
                       val_fraction=config.val_fraction, progress=config.progress)
    device = resolve_device("auto")
    images = discover(config.data)
    train_indices, val_indices = stratified_split(images.labels, config.val_fraction, config.seed)
    def backbone() -> nn.Module:  # built only when some features are not cached yet
        return create_model(base.model, len(images.class_names), pretrained=True, freeze_backbone=True).backbone

    data = load_head_data(base, backbone, resolve_preprocess(base, "head"), images.subset(train_indices), images.subset(val_indices), device, log)
    feature_dim, classes = data.train_samples.shape[-1], len(images.class_names)
    plain_loss = nn.CrossEntropyLoss()
    val_batches = FeatureBatches(data.val_features, data.val_labels, 1024, shuffle=False)

    def objective(trial: "optuna.Trial") -> float:
        trial_config = replace(
            base,
            lr=trial.suggest_float("lr", 1e-4, 3e-2, log=True),
            batch_size=trial.suggest_categorical("batch_size", [64, 128, 256, 512]),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.1),
            epochs=trial.suggest_int("epochs", 5, config.max_epochs),
            optimizer=trial.suggest_categorical("optimizer", ["adamw", "adam"]),
        )
        seed_everything(config.seed + trial.number)
        head = nn.Linear(feature_dim, classes)
        loss_function = nn.CrossEntropyLoss(label_smoothing=trial_config.label_smoothing)
        optimizer = build_optimizer(head.parameters(), trial_config)
        scheduler = build_scheduler(optimizer, trial_config, math.ceil(len(data.train_labels) / trial_config.batch_size))
        best = float("inf")
        for epoch in range(trial_config.epochs):
            batches = FeatureBatches(data.train_samples, data.train_labels, trial_config.batch_size, True, config.seed, epoch)
            train_one_epoch(head, batches, optimizer, scheduler, loss_function, torch.device("cpu"), trial_config.grad_clip)
            val_loss, val_accuracy, _, _ = evaluate(head, val_batches, plain_loss, torch.device("cpu"))
            best = min(best, val_loss)
            trial.set_user_attr("val_accuracy", val_accuracy)
            trial.report(val_loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=config.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3))
    started = time.perf_counter()
    study.optimize(objective, n_trials=config.trials, timeout=config.timeout * 60 or None)
    states = [trial.state.name for trial in study.trials]
    out = Path(config.out)
    write_csv_atomic(out / "trials.csv", ["number", "state", "val_loss", *sorted(study.best_params)],
                     [[t.number, t.state.name, t.value, *[t.params.get(k) for k in sorted(study.best_params)]] for t in study.trials])
    best = {"preset": config.preset, "strategy": "head", **study.best_params}
    write_text_atomic(out / "best_config.yaml", "".join(f"{key}: {value}\n" for key, value in best.items()))
    summary = {"best_val_loss": study.best_value, "best_params": study.best_params, "trials": len(study.trials),
               "pruned": states.count("PRUNED"), "completed": states.count("COMPLETE"),
               "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / "study.json", summary)
    log(f"{summary['trials']} trials ({summary['pruned']} pruned) in {summary['seconds']} s; best validation loss "
        f"{study.best_value:.4f} with {study.best_params}")
    log(f"train with them: catdog train --data {config.data} --config {out / 'best_config.yaml'} --out RUN")
    return summary
