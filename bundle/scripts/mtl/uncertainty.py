"""Uncertainty weighting (Kendall-Gal) of the task losses alone, the baseline without the rest of IGReg."""

from __future__ import annotations

import torch
from torch import Tensor

from scripts.mtl.base import BatchLayout, MTLStrategy, OptimizerFactory
from scripts.mtl.gradients import all_task_losses
from scripts.networks import IGRegNet
from scripts.objective import UncertaintyWeighting


class UncertaintyOnly(MTLStrategy):
    """Kendall-Gal uncertainty weighting with one log-variance per task (each classification
    cross-entropy and the segmentation Dice), and nothing else of IGReg."""

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False) -> None:
        super().__init__(network, optimizer, amp)
        self.names = [f"cls_{t}" for t in network.tasks] + ["seg"]
        self.weighting = UncertaintyWeighting(self.names).to(self.device)
        self.optimizers = [self.make_optimizer(list(network.parameters()) + list(self.weighting.parameters()))]

    def objective_terms(self, batch: dict) -> dict[str, Tensor]:
        terms = super().objective_terms(batch)
        return {name: self.weighting.weight(key) * terms[name]
                for name, key in zip([*self.network.tasks, "seg"], self.names)}

    def step(self, batch: dict) -> dict[str, Tensor]:
        self.skipped = []
        layout = BatchLayout.of(batch)
        out = self.forward_tasks(batch, layout)
        losses = dict(zip(self.names, all_task_losses(out)))
        present = {**{n: bool(rows) for n, rows in zip(self.names, layout.task_rows)}, "seg": bool(layout.seg_rows)}
        total = self.weighting(losses, present)
        self._update(self.optimizers[0], total, losses)
        cls = torch.stack(out.task_losses).sum()
        return {"loss": total.detach(), "cls": cls.detach(), "seg": out.seg_loss.detach(), **self._task_logs(out)}
