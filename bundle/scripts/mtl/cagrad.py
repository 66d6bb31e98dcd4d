"""CAGrad (Liu et al., 2021): the merge rule `cagrad` and its task weights `cagrad_weights`, plain functions of
a `[T, P]` gradient matrix that can be checked by hand, and the strategy `CAGrad` on the shared trunk."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from scripts.mtl.base import OptimizerFactory
from scripts.mtl.surgery import GradientSurgery
from scripts.networks import IGRegNet


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
