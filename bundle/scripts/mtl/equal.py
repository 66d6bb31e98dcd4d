"""Equal weighting: the plain multi-task baseline (one summed loss, one update)."""

from __future__ import annotations

import torch
from torch import Tensor

from scripts.mtl.base import BatchLayout, MTLStrategy, OptimizerFactory
from scripts.networks import IGRegNet


class EqualWeighting(MTLStrategy):
    """Plain multi-task learning: sum of the task cross-entropies plus the segmentation Dice, one
    forward, one backward and one optimizer step."""

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False) -> None:
        super().__init__(network, optimizer, amp)
        self.optimizers = [self.make_optimizer(self.network.parameters())]

    def step(self, batch: dict) -> dict[str, Tensor]:
        self.skipped = []
        out = self.forward_tasks(batch, BatchLayout.of(batch))
        cls = torch.stack(out.task_losses).sum()
        loss = cls + out.seg_loss
        self._update(self.optimizers[0], loss, {"cls": cls, "seg": out.seg_loss})
        return {"loss": loss.detach(), "cls": cls.detach(), "seg": out.seg_loss.detach(), **self._task_logs(out)}
