"""Baselines for the ablation: uncertainty weighting of the task losses, PCGrad and CAGrad.

The tasks are the classification tasks plus the segmentation. The shared trunk is the encoder and
the neck, the parameters every task's loss reaches; PCGrad and CAGrad combine the per-task
gradients of the shared trunk, while every other parameter (classification branch, decoder) gets
its plain gradient of the summed losses.

The combination rules are plain functions of a `[T, P]` gradient matrix (`pcgrad`, `cagrad`), so
that they can be checked by hand.
"""

from __future__ import annotations

import abc
import random
from typing import List, Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from torch.nn import Parameter

from scripts.networks import IGRegNet
from scripts.objective import UncertaintyWeighting
from scripts.strategies import BatchLayout, MTLStrategy, OptimizerFactory, TaskForward


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


def cagrad_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """Task weights w on the simplex minimising w.(G 1/T) + c |g0| sqrt(w.G w), the dual of CAGrad's
    inner problem, from the Gram matrix G [T, T] of the task gradients (|g0|^2 = mean of G)."""
    t = gram.shape[0]
    scale = gram.mean()
    if t == 1 or not scale > 0:
        return np.full(t, 1.0 / t)
    g = gram / scale                                  # scale-free: |g0| = 1
    a = g.mean(1)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        norm = np.sqrt(max(w @ g @ w, 1e-12))
        return float(w @ a + c * norm), a + c * (g @ w) / norm

    res = minimize(objective, np.full(t, 1.0 / t), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                   options={"ftol": 1e-12, "maxiter": 200})
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def cagrad(grads: Tensor, c: float = 0.5) -> Tensor:
    """CAGrad (Liu et al., 2021) direction of task gradients `grads` [T, P] -> [P], rescaled by 1 / (1 + c^2).

    With g0 the mean gradient and w from `cagrad_weights`, g_w = sum_i w_i g_i and the direction is
    (g0 + c |g0| / |g_w| g_w) / (1 + c^2); c = 0 gives g0.
    """
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    w = torch.as_tensor(cagrad_weights(gram, c), dtype=grads.dtype, device=grads.device)
    g0 = grads.mean(0)
    gw = w @ grads
    g0_norm = float(np.sqrt(max(gram.mean(), 0.0)))
    gw_norm = gw.norm()
    lam = torch.where(gw_norm > 0, c * g0_norm / gw_norm.clamp_min(torch.finfo(grads.dtype).tiny),
                      torch.zeros_like(gw_norm))
    return (g0 + lam * gw) / (1 + c * c)


class UncertaintyOnly(MTLStrategy):
    """Kendall-Gal uncertainty weighting with one log-variance per task (each classification
    cross-entropy and the segmentation Dice), and nothing else of IGReg."""

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False) -> None:
        super().__init__(network, optimizer, amp)
        self.names = [f"cls_{t}" for t in network.tasks] + ["seg"]
        self.weighting = UncertaintyWeighting(self.names).to(self.device)
        self.optimizers = [self.make_optimizer(list(network.parameters()) + list(self.weighting.parameters()))]

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


class PCGrad(GradientSurgery):
    """PCGrad on the shared trunk; each task's projection order is drawn with Python's `random`
    (whose state the training checkpoints keep, so a resumed run draws the same orders)."""

    def combine(self, grads: Tensor) -> Tensor:
        t = grads.shape[0]
        return pcgrad(grads, [random.sample([j for j in range(t) if j != i], t - 1) for i in range(t)])


class CAGrad(GradientSurgery):
    """CAGrad on the shared trunk with conflict-aversion radius `c`; the direction is multiplied by
    the number of tasks so that with c = 0 it is the summed gradient of equal weighting."""

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False, c: float = 0.5) -> None:
        super().__init__(network, optimizer, amp)
        self.c = c

    def combine(self, grads: Tensor) -> Tensor:
        if not bool(torch.isfinite(grads).all()):  # the guard skips this step; keep the solver off NaNs
            return grads.sum(0)
        return cagrad(grads, self.c) * grads.shape[0]
