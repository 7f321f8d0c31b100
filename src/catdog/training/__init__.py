"""Training's building blocks, below the `catdog train` command (`catdog/training/train.py`) and `catdog tune`.

`config` (TrainConfig, presets, the strategy and input size a run uses) is at the bottom; `loop` (the shared
epoch loop, optimizer, schedule, seeding, run bookkeeping) builds on it; the two strategies, `head` (a linear head
on cached frozen features) and `finetune` (the network on augmented images), build on both. Imports go downward
only: nothing here imports `catdog.training.train`.
"""
