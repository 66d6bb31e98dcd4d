"""Deterministic, seeded values for every tensor of a state dict (no weights are stored in fixtures)."""

from __future__ import annotations

import zlib
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 62))


def seeded_tensor(name: str, shape: Sequence[int], seed: int) -> Tensor:
    """A value for tensor `name` of `shape` that keeps activations O(1): fan-in scaled weights,
    small biases, BatchNorm running variances in [0.5, 1.5], PReLU slopes near 0.25, norm scales
    and fusion weights near 1, integer batch counters."""
    shape = tuple(int(s) for s in shape)
    gen = _generator(seed, name)
    if name.endswith("num_batches_tracked"):
        return torch.randint(0, 1000, shape, generator=gen, dtype=torch.long)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    if name.endswith("running_mean") or name.endswith("bias"):
        return 0.1 * noise
    if len(shape) >= 2:
        return noise / float(np.prod(shape[1:])) ** 0.5
    if shape == (1,):
        return 0.25 + 0.05 * noise
    return 1.0 + 0.1 * noise


def seeded_state(names_and_shapes: Iterable[Tuple[str, Sequence[int]]], seed: int) -> Dict[str, Tensor]:
    """A full state dict from (name, shape) pairs and a seed; the same pairs and seed give the same values."""
    return {name: seeded_tensor(name, shape, seed) for name, shape in names_and_shapes}


def pack_names_and_shapes(state: Dict[str, Tensor]) -> Dict[str, np.ndarray]:
    """Names and shapes of a state dict as arrays for an `.npz` fixture."""
    names = list(state)
    shapes = [tuple(state[n].shape) for n in names]
    flat = np.array([d for s in shapes for d in s], dtype=np.int64)
    return {"state_names": np.array(names), "state_ndims": np.array([len(s) for s in shapes], dtype=np.int64),
            "state_dims": flat}


def unpack_names_and_shapes(data) -> list[Tuple[str, Tuple[int, ...]]]:
    out, offset = [], 0
    for name, ndim in zip(data["state_names"], data["state_ndims"]):
        out.append((str(name), tuple(int(d) for d in data["state_dims"][offset:offset + ndim])))
        offset += int(ndim)
    return out


def seeded_input(shape: Sequence[int], seed: int) -> Tensor:
    """Standard-normal input (image batch or encoder features) of `shape` from `seed`."""
    return torch.randn(tuple(int(s) for s in shape), generator=torch.Generator().manual_seed(int(seed)))
