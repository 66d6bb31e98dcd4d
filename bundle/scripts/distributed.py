"""torch.distributed helpers for the torchrun configuration (configs/multi_gpu_train.yaml).

Each is a no-op, or runs as in a single process, when no process group is initialised.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import Tensor, nn

T = TypeVar("T")


def world_size() -> int:
    """Ranks in the default process group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 outside torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def average_across_ranks(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its mean over the ranks (in place, one all-reduce for all of them);
    nothing to do outside torch.distributed or with one rank."""
    if not tensors or world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    _unflatten(flat, tensors)


def _unflatten(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s values (in place), so
    that all ranks hold the same state. Tensors travel as raw bytes (bool buffers included)."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.detach()
        buffer = data if data.is_contiguous() else data.contiguous()
        dist.broadcast(buffer.reshape(-1).view(torch.uint8), src)
        if buffer is not data:
            data.copy_(buffer)


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers of `module` across ranks and copy rank 0's others (in
    place): BatchNorm running statistics move with each rank's own rows during training."""
    if world_size() == 1:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for dtype, buffers in groups.items():
        if dtype.is_floating_point:
            average_across_ranks(buffers)
        else:
            flat = torch.cat([b.detach().reshape(-1) for b in buffers])
            dist.broadcast(flat.view(torch.uint8), 0)
            _unflatten(flat, buffers)


class BufferSync:
    """Ignite handler: `sync_buffers(module)` after every iteration, so that every rank validates
    and saves the same network. Attach it before the handlers that save the state."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        sync_buffers(self.module)


def rank_zero_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on rank 0, then, after a barrier, on the other ranks: for a step that
    creates shared files on first use (the demo cohort), which the others then only read."""
    if rank() == 0:
        result = fn(*args, **kwargs)
        if world_size() > 1:
            dist.barrier()
        return result
    dist.barrier()
    return fn(*args, **kwargs)
