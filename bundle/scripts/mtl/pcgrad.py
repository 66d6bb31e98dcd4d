"""PCGrad (Yu et al., 2020): the merge rule `pcgrad`, a plain function of a `[T, P]` gradient matrix that can be
checked by hand, and the strategy `PCGrad` on the shared trunk."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor

from scripts.mtl.surgery import GradientSurgery


def pcgrad(grads: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad (Yu et al., 2020) of task gradients `grads` [T, P] -> [P].

    Task i's gradient is projected, in the order `orders[i]` (other task indices), onto the normal
    plane of every original task gradient g_j it conflicts with at that point (negative dot
    product): g_i <- g_i - (g_i . g_j / |g_j|^2) g_j. The result is the sum of the projected gradients.
    """
    tiny = torch.finfo(grads.dtype).tiny
    norms2 = (grads * grads).sum(1).clamp_min(tiny)
    out = grads.clone()
    for i, order in enumerate(orders):
        for j in order:
            dot = out[i] @ grads[j]
            out[i] -= torch.where(dot < 0, dot / norms2[j], torch.zeros_like(dot)) * grads[j]
    return out.sum(0)


class PCGrad(GradientSurgery):
    """PCGrad on the shared trunk; each task's projection order is drawn with Python's `random`
    (whose state the training checkpoints keep, so a resumed run draws the same orders)."""

    def combine(self, grads: Tensor) -> Tensor:
        t = grads.shape[0]
        return pcgrad(grads, [random.sample([j for j in range(t) if j != i], t - 1) for i in range(t)])
