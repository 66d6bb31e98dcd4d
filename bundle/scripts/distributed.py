"""Collectives of the torchrun configuration (configs/multi_gpu_train.yaml) that ignite has no handler for.

Ranks, world size and "rank 0 first" come from `ignite.distributed` (`idist.get_rank`,
`idist.get_world_size`, `idist.one_rank_first`). Each helper here is a no-op, or runs as in a single
process, when no process group is initialised.
"""

from __future__ import annotations

from typing import Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import Tensor, nn


@torch.no_grad()
def average_across_ranks(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its mean over the ranks (in place, one all-reduce for all of them);
    nothing to do outside torch.distributed or with one rank."""
    if not tensors or idist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _unflatten(idist.all_reduce(flat) / idist.get_world_size(), tensors)


def _unflatten(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _broadcast_bytes(tensor: Tensor, src: int = 0) -> Tensor:
    """Rank `src`'s `tensor` (contiguous), sent as raw bytes so that any dtype travels (bool included)."""
    return idist.broadcast(tensor.reshape(-1).view(torch.uint8), src=src).view(tensor.dtype).view_as(tensor)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s values (in place), so
    that all ranks hold the same state."""
    if idist.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.detach()
        received = _broadcast_bytes(data.contiguous(), src)
        if received.data_ptr() != data.data_ptr():  # not received in place (a copy of a non-contiguous tensor)
            data.copy_(received)


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers of `module` across ranks and copy rank 0's others (in
    place): BatchNorm running statistics move with each rank's own rows during training."""
    if idist.get_world_size() == 1:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for dtype, buffers in groups.items():
        if dtype.is_floating_point:
            average_across_ranks(buffers)
        else:
            _unflatten(_broadcast_bytes(torch.cat([b.detach().reshape(-1) for b in buffers])), buffers)


class BufferSync:
    """Ignite handler: `sync_buffers(module)` after every iteration, so that every rank validates
    and saves the same network. Attach it before the handlers that save the state."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        sync_buffers(self.module)
