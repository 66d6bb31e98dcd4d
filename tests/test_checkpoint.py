"""Atomic checkpoint writes, weights-only reads and refusal of foreign or unsafe files."""
import os

import pytest
import torch
from torch import nn

from scripts.checkpoint import CheckpointError, atomic_save, load_network_weights, safe_load


def test_atomic_save_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"x": torch.ones(3)}, path)
    atomic_save({"x": torch.zeros(3)}, path)
    assert torch.equal(safe_load(path)["x"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, path)
    assert torch.equal(safe_load(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        safe_load(path)


class Payload:
    """An arbitrary class: loading it would run pickled code paths."""


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Payload()}, path)
    with pytest.raises(CheckpointError):
        safe_load(path)


def test_foreign_weights_are_named(tmp_path):
    small = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Linear(4, 2))
    other = nn.Sequential(nn.Conv3d(4, 4, 3), nn.Linear(4, 2), nn.Linear(2, 2))
    path = tmp_path / "model.pt"
    atomic_save(other.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_network_weights(small, path)
    msg = str(err.value)
    assert "0.weight: checkpoint shape (4, 4, 3, 3, 3) vs network (4, 2, 3, 3, 3)" in msg
    assert "not in this network: 2.bias, 2.weight" in msg
    atomic_save(small.state_dict(), path)
    fresh = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Linear(4, 2))
    load_network_weights(fresh, path)
    assert torch.equal(fresh[0].weight, small[0].weight)
