"""Safe formats only, atomic writes, and training state that round-trips exactly."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch

from catdog.training.checkpoint import flatten_state, load_model, load_training_state, save_training_state, unflatten_state

from catdog.runtime.runs import RunError
from catdog.runtime.files import write_text_atomic


def test_training_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"epoch": 3, "history": [{"loss": 0.5}], "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "pair": (1, "a"), "none": None}
    save_training_state(tmp_path / "state.safetensors", state)
    loaded = load_training_state(tmp_path / "state.safetensors")
    assert loaded["epoch"] == 3 and loaded["history"] == [{"loss": 0.5}] and loaded["pair"] == (1, "a")
    assert torch.equal(loaded["rng"], state["rng"])
    restored = torch.optim.AdamW(model.parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_flatten_rejects_arbitrary_objects():
    with pytest.raises(TypeError):
        flatten_state({"bad": object()})
    tensors, skeleton = flatten_state({1: torch.ones(2)})
    assert unflatten_state(tensors, skeleton)[1].tolist() == [1.0, 1.0]


def test_pickles_are_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not even read")
    with pytest.raises(RunError, match="pickled"):
        load_model(tmp_path / "model.pt")
    with pytest.raises(RunError, match="not a catdog run"):
        load_model(tmp_path)


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    from catdog.runtime.files import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_streams_into_a_pipe_and_keeps_it_a_pipe(tmp_path):
    """`--output /dev/null` or a named pipe: the content goes through, and the pipe (or device) is not replaced by a file."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()), daemon=True)
    reader.start()
    write_text_atomic(pipe, "path,label\na.jpg,cat\n")
    reader.join(timeout=10)
    assert received == ["path,label\na.jpg,cat\n"]
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert [entry.name for entry in tmp_path.iterdir()] == ["pipe"]  # no temporary left beside it


def test_atomic_write_to_dev_null_keeps_the_device():
    write_text_atomic(os.devnull, "nothing to see\n")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_atomic_write_through_a_link_keeps_the_link(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
