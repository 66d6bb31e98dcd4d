"""Checkpoint files: atomic writes, weights-only reads and a readable refusal of foreign weights."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

_TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, pickled objects or another model."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` with torch.save so that `path` holds either the old or the new file, never half.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(path: str | os.PathLike) -> None:
    """Delete the temporary files an `atomic_save` to `path` left when its process was killed."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(..., weights_only=True)`; a truncated file or one needing pickled objects raises CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)!r} as tensors and plain values: {e}") from e


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a network's state_dict and a checkpoint's."""
    lines = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        lines.append(f"missing from the checkpoint: {_summarise(missing)}")
    if extra:
        lines.append(f"not in this network: {_summarise(extra)}")
    for k in sorted(set(expected) & set(found)):
        if tuple(expected[k].shape) != tuple(found[k].shape):
            lines.append(f"{k}: checkpoint shape {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}")
    return lines


def _summarise(keys: list[str], most: int = 6) -> str:
    """Group parameter names by their first two components (e.g. `heads.grade`) and list a few."""
    groups = sorted({".".join(k.split(".")[:2]) for k in keys})
    more = f" (+{len(groups) - most} more)" if len(groups) > most else ""
    return ", ".join(groups[:most]) + more


def load_network_weights(network: nn.Module, path: str | os.PathLike,
                         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a state_dict checkpoint (plain or under a `model` key) into `network`, refusing foreign weights."""
    state = safe_load(path, map_location)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{os.fspath(path)!r} is not a state_dict of tensors")
    diff = describe_mismatch(network.state_dict(), state)
    if diff:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} was trained with another configuration (tasks, widths or channels):\n  "
            + "\n  ".join(diff))
    network.load_state_dict(state)
    return network
