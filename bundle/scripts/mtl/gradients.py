"""Per-task gradients of the shared trunk, the helpers of the gradient baselines (uncertainty, PCGrad, CAGrad)
and of the gradient-conflict diagnostics.

The tasks are the classification tasks plus the segmentation. The shared trunk is the encoder and
the neck, the parameters every task's loss reaches; PCGrad and CAGrad combine the per-task
gradients of the shared trunk, while every other parameter (classification branch, decoder) gets
its plain gradient of the summed losses.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor
from torch.nn import Parameter

from scripts.mtl.base import TaskForward
from scripts.networks import IGRegNet


def shared_parameters(network: IGRegNet) -> List[Parameter]:
    """The trainable parameters of the shared trunk (encoder and neck), in a fixed order."""
    return [p for m in (network.encoder, network.neck) for p in m.parameters() if p.requires_grad]


def all_task_losses(out: TaskForward) -> List[Tensor]:
    """Per-task losses in task order: each classification task's cross-entropy, then the segmentation Dice."""
    return [*out.task_losses, out.seg_loss]


def task_gradients(losses: Sequence[Tensor], params: Sequence[Parameter]) -> List[List[Tensor | None]]:
    """Gradient of each loss with respect to `params` (None where a parameter is not reached, every
    entry None for a loss without a graph); the graph is kept for the next loss."""
    grads = []
    for loss in losses:
        if loss.requires_grad:
            grads.append(list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
        else:
            grads.append([None] * len(params))
    return grads


def flatten(grads: Sequence[Tensor | None], params: Sequence[Parameter]) -> Tensor:
    """One flat float32 vector of `grads` (zeros for None)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
