"""Loss functions shared by the strategies and the Kendall-Gal uncertainty weighting of loss terms."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

DICE_SMOOTH = 1e-5


def soft_dice(prob: Tensor, target: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """Soft Dice coefficient per sample (and per trailing channel): `prob`, `target` [B, V, ...]
    where V is the flattened space; returns [B, ...]."""
    inter = (prob * target).sum(1)
    return (2 * inter + smooth) / (prob.sum(1) + target.sum(1) + smooth)


def dice_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """1 - mean foreground soft Dice of 2-class logits [B, 2, *S] against a binary mask [B, 1, *S]
    (background channel excluded, one Dice per sample)."""
    prob = torch.softmax(logits.float(), 1)[:, 1].flatten(1)
    return 1 - soft_dice(prob, mask.float().flatten(1)).mean()


def segmentation_loss(logits: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Sum of the Dice losses of every segmentation head (main head and deep-supervision heads)."""
    return torch.stack([dice_loss(x, mask) for x in logits]).sum()


class UncertaintyWeighting(nn.Module):
    """Kendall-Gal weighting: sum_i exp(-s_i) * L_i + s_i with one learnable log-variance s_i per term.

    A term whose `present` flag is False (for example a task without a labelled row in the batch, or
    a feature regularizer that gated no sample) contributes nothing, its log-variance included, so
    that a step without data for a term does not push that term's log-variance down.
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def weight(self, name: str) -> Tensor:
        """The current weight exp(-s) of term `name` (detached)."""
        return torch.exp(-self.log_vars[self.names.index(name)]).detach()

    def forward(self, losses: dict[str, Tensor], present: dict[str, Tensor | bool] | None = None) -> Tensor:
        """Weighted sum of `losses[name]` over the weighting's names; `present[name]` is a Python bool
        (False drops the term) or a boolean tensor (checked on the device, no host sync)."""
        present = present or {}
        total = self.log_vars.new_zeros(())
        for i, name in enumerate(self.names):
            flag = present.get(name, True)
            if flag is False:
                continue
            term = torch.exp(-self.log_vars[i]) * losses[name].float() + self.log_vars[i]
            if isinstance(flag, Tensor):
                term = torch.where(flag, term, torch.zeros_like(term))
            total = total + term
        return total
