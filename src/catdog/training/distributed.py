"""Several processes, GPUs or machines with `torch.distributed`, launched by `torchrun`.

catdog has no launcher of its own: `torchrun` starts one process per GPU (or CPU share) and sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_from_environment` joins the process group those describe, with
NCCL on CUDA and gloo on a CPU. Without those variables everything here degrades to one process (rank 0 of 1), so
the commands call these helpers unconditionally and one code path serves both cases.

The process group's timeout is finite (`CATDOG_DIST_TIMEOUT_MINUTES`, default 30): a rank that died or hangs makes
the others fail with an error instead of waiting forever. A barrier waits for the slowest rank, so the timeout has
to cover the longest uneven stretch of work (one rank's share of a feature extraction, say).
"""

from __future__ import annotations

import contextlib
import gc
import os
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MINUTES = 30.0
Item = TypeVar("Item")


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher following its conventions) started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> timedelta:
    minutes = float(os.environ.get("CATDOG_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES))
    if not minutes > 0:
        raise ValueError(f"CATDOG_DIST_TIMEOUT_MINUTES must be a positive number of minutes, not {minutes}")
    return timedelta(minutes=minutes)


def init_from_environment(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return the device this rank works on.

    On CUDA each process on a machine takes the GPU numbered by its LOCAL_RANK, so `--device cuda` (or auto) under
    `torchrun --nproc_per_node K` uses K GPUs. Outside torchrun the device is returned unchanged."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout(), device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    """Leave the process group (torch warns at exit when a process never did).

    Unreachable DistributedDataParallel wrappers are collected first (a reference cycle can keep one, and the
    gloo threads of its reducer, alive until interpreter teardown, where a joinable C++ thread aborts the process:
    "terminate called without an active exception", seen now and then on 2 CPUs); then all ranks meet, so none
    tears its connections down while a peer still reads from them."""
    if dist.is_initialized():
        gc.collect()
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes run files, CSVs and logs."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank: for decisions that must be the same everywhere (stop now, or not)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard_indices(count: int, shard: int | None = None, shards: int | None = None) -> list[int]:
    """This rank's positions among `count` items: every `shards`-th one from `shard` on. The shares are disjoint,
    cover every item exactly once (no padding with repeats, unlike DistributedSampler's default) and differ in
    length by at most one."""
    shard = rank() if shard is None else shard
    shards = world_size() if shards is None else shards
    return list(range(shard, count, shards))


def shard(items: Sequence[Item]) -> list[Item]:
    return [items[i] for i in shard_indices(len(items))]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Let rank 0 run the block first (filling a shared cache: an ONNX export, say) and the others after it, so
    they find the result instead of all doing the same work at once."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()
