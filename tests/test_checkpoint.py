"""Safe formats only, atomic writes, and training state that round-trips exactly."""

from __future__ import annotations

import os

import pytest
import torch

from catdog.checkpoint import RunError, flatten_state, load_model, load_training_state, save_training_state, unflatten_state
from catdog.files import write_text_atomic


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
    from catdog.files import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
