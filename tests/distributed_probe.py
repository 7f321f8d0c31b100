"""Runs `catdog` inside a torchrun worker and records what this rank did, for tests/test_distributed.py.

    python -m torch.distributed.run ... tests/distributed_probe.py RECORDS [--die-after-epoch N] -- train ...

Each rank appends JSON lines to RECORDS/rank<R>.jsonl as it goes (so a killed run leaves its records):
- {"load": path, "epoch": E}: an image the rank decoded, E being the epoch its DistributedSampler was set to
  ("final" after training: the best model's validation pass);
- {"replace": path}: a file the rank wrote (catdog writes every file atomically through os.replace);
- {"params": file, "epoch": E}: the rank's parameters after training epoch E, saved to `file`;
- {"pid": pid}: the rank's process id (TensorBoard names its event file after it).
With --die-after-epoch N rank 0 kills itself (SIGKILL) right after writing the checkpoint of epoch N.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import catdog.training.datasets
import catdog.training.finetune
from catdog.cli import main

parser = argparse.ArgumentParser()
parser.add_argument("records", type=Path)
parser.add_argument("--die-after-epoch", type=int, default=0)
split_at = sys.argv.index("--")
options = parser.parse_args(sys.argv[1:split_at])
arguments = sys.argv[split_at + 1 :]
rank = int(os.environ.get("RANK", "0"))
options.records.mkdir(parents=True, exist_ok=True)
record_file = options.records / f"rank{rank}.jsonl"
current_epoch: list[int | str] = ["before"]


def record(**values) -> None:
    with open(record_file, "a") as stream:
        stream.write(json.dumps(values) + "\n")


record(pid=os.getpid())

original_getitem = catdog.training.datasets.ImageFileDataset.__getitem__


def recording_getitem(self, index):
    record(load=str(self.paths[index]), epoch=current_epoch[0])
    return original_getitem(self, index)


catdog.training.datasets.ImageFileDataset.__getitem__ = recording_getitem

original_set_epoch = torch.utils.data.DistributedSampler.set_epoch


def recording_set_epoch(self, epoch):
    current_epoch[0] = epoch
    return original_set_epoch(self, epoch)


torch.utils.data.DistributedSampler.set_epoch = recording_set_epoch

original_replace = os.replace


def recording_replace(source, destination, **keywords):
    record(replace=str(destination))
    return original_replace(source, destination, **keywords)


os.replace = recording_replace

original_train_one_epoch = catdog.training.finetune.train_one_epoch


def recording_train_one_epoch(model, *positional, **keywords):
    result = original_train_one_epoch(model, *positional, **keywords)
    epoch = current_epoch[0]
    file = options.records / f"params-rank{rank}-epoch{epoch}.safetensors"
    save_file({name: value.detach().clone().contiguous() for name, value in model.named_parameters()}, str(file))
    record(params=str(file), epoch=epoch)
    return result


catdog.training.finetune.train_one_epoch = recording_train_one_epoch

original_save_training_state = catdog.training.finetune.save_training_state


def save_training_state_then_maybe_die(path, state):
    original_save_training_state(path, state)
    if options.die_after_epoch and state["epoch"] + 1 == options.die_after_epoch:
        os.kill(os.getpid(), signal.SIGKILL)


catdog.training.finetune.save_training_state = save_training_state_then_maybe_die

original_load_model = catdog.training.finetune.load_model


def load_model_for_the_final_pass(*positional, **keywords):
    current_epoch[0] = "final"
    return original_load_model(*positional, **keywords)


catdog.training.finetune.load_model = load_model_for_the_final_pass

sys.exit(main(arguments))
