"""Gradient surgery: the common step of PCGrad and CAGrad (per-task gradients of the shared trunk merged by a
rule, the plain summed gradient elsewhere)."""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from scripts.mtl.base import BatchLayout, MTLStrategy, OptimizerFactory
from scripts.mtl.gradients import all_task_losses, flatten, shared_parameters, task_gradients
from scripts.networks import IGRegNet


class GradientSurgery(MTLStrategy):
    """One forward, one gradient per task; the shared trunk's per-task gradients are merged by
    `combine`, the other parameters get the gradient of the summed losses; one optimizer step."""

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False) -> None:
        super().__init__(network, optimizer, amp)
        self.optimizers = [self.make_optimizer(network.parameters())]

    @abc.abstractmethod
    def combine(self, grads: Tensor) -> Tensor:
        """Merge the shared trunk's task gradients [T, P] into one gradient [P]."""

    def step(self, batch: dict) -> dict[str, Tensor]:
        self.skipped = []
        out = self.forward_tasks(batch, BatchLayout.of(batch))
        losses = all_task_losses(out)
        shared = shared_parameters(self.network)
        ids = {id(p) for p in shared}
        rest = [p for p in self.network.parameters() if p.requires_grad and id(p) not in ids]
        per_task = task_gradients(losses, shared + rest)
        merged = self.combine(torch.stack([flatten(g[:len(shared)], shared) for g in per_task]))
        optimizer = self.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        offset = 0
        for p in shared:
            p.grad = merged[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        for k, p in enumerate(rest, start=len(shared)):
            parts = [g[k] for g in per_task if g[k] is not None]
            p.grad = torch.stack(parts).sum(0) if parts else None
        cls = torch.stack(out.task_losses).sum()
        if any(loss.requires_grad for loss in losses):
            self._apply_gradients(optimizer, {"cls": cls, "seg": out.seg_loss})
        loss = cls + out.seg_loss
        return {"loss": loss.detach(), "cls": cls.detach(), "seg": out.seg_loss.detach(), **self._task_logs(out)}
