"""STDGP, surrogate task-dominant gradient projection.

One surrogate classifier per task (a copy of the network's classification path: neck and
classification branch, with task heads of its own), re-copied from the main network every outer
iteration except for its heads. In a surrogate
step, surrogate k keeps task k's gradient as it is and removes from every other task's gradient
its component against task k's; the sum is applied by the surrogate's own optimizer. The main
network is then pulled toward a surrogate's feature for the samples where the surrogate predicts
the true class better (the gated feature regularizer).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

DISTANCES = ("l2", "mse", "cosine")


def task_dominant_projection(task_grads: Tensor, dominant: int) -> Tensor:
    """Merge flattened per-task gradients [T, P] around task `dominant`.

    The dominant gradient g_k is kept; every other g_i with g_i . g_k < 0 becomes
    g_i - (g_i . g_k / |g_k|^2) g_k; the result is the sum [P]. A zero dominant gradient conflicts
    with nothing, so the result is then the plain sum.
    """
    g_k = task_grads[dominant]
    dots = task_grads @ g_k
    norm2 = (g_k @ g_k).clamp_min(torch.finfo(task_grads.dtype).tiny)
    coef = torch.where(dots < 0, dots / norm2, torch.zeros_like(dots))  # the dominant row has dots >= 0
    return task_grads.sum(0) - coef.sum() * g_k


class Surrogate(nn.Module):
    """A copy of a network's classification path; `forward(encoder features) -> (F_t, logits per task)`.

    As in the reference's auxiliary classifiers, the task heads are the surrogate's own: initialised
    independently of the network's, never copied from it, trained only by surrogate steps.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.neck = copy.deepcopy(network.neck)
        self.classifier = copy.deepcopy(network.classifier)
        for head in self.classifier.heads:
            head.reset_parameters()

    @torch.no_grad()
    def load_from(self, network: nn.Module) -> None:
        """Copy the network's current neck and classification branch, all but the task heads, into
        this surrogate."""
        self.neck.load_state_dict(network.neck.state_dict())
        for name, module in network.classifier.named_children():
            if name != "heads":
                getattr(self.classifier, name).load_state_dict(module.state_dict())

    def feature(self, feats: List[Tensor]) -> Tensor:
        """F_t for encoder features of some rows (neck and classification branch, no head)."""
        scales, _ = self.neck(feats)
        return self.classifier.features(scales)

    def task_logits(self, feats: List[Tensor], task: int) -> Tuple[Tensor, Tensor]:
        """(F_t, logits of head `task`) for encoder features of some rows."""
        feature = self.feature(feats)
        return feature, self.classifier.heads[task](feature)

    def forward(self, feats: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        scales, _ = self.neck(feats)
        return self.classifier(scales)


def task_gradients(surrogate: Surrogate, task_batches: Sequence[Tuple[int, List[Tensor], Tensor]],
                   autocast: Callable[[], AbstractContextManager] = nullcontext) -> Tuple[Tensor, List[int], Tensor]:
    """Flattened gradient of each task's loss over the surrogate's parameters.

    Args:
        task_batches: `(task, encoder features of the task's rows, labels)` for every task that has
            labelled rows; each task's loss sees only its own rows (one forward and one backward each).
        autocast: returns the context for the forward passes (mixed precision).

    Returns (gradients [T', P] in the order of `task_batches`, their task indices, detached sum of the losses).
    """
    return synced_task_gradients([surrogate], task_batches, autocast)[0]


def synced_task_gradients(surrogates: Sequence[Surrogate], task_batches: Sequence[Tuple[int, List[Tensor], Tensor]],
                          autocast: Callable[[], AbstractContextManager] = nullcontext
                          ) -> List[Tuple[Tensor, List[int], Tensor]]:
    """`task_gradients` of each surrogate, for surrogates whose neck and classification branch hold the
    same values (as `load_from` leaves them; the task heads may differ).

    Each task's rows go once through the first surrogate's neck and branch; every surrogate's loss,
    through its own head, is back-propagated through that one graph. These are the operations that
    `task_gradients` runs per surrogate, on the same values, so the results are the same numbers with
    one forward per task instead of one per task and surrogate.
    """
    first = surrogates[0]
    body = dict(first.named_parameters())
    params = [[p if name.startswith("classifier.heads.") else body[name]
               for name, p in s.named_parameters() if p.requires_grad] for s in surrogates]
    grads: List[List[Tensor]] = [[] for _ in surrogates]
    losses: List[List[Tensor]] = [[] for _ in surrogates]
    for task, feats, labels in task_batches:
        with autocast():
            feature = first.feature(feats)
        for k, surrogate in enumerate(surrogates):
            with autocast():
                logits = surrogate.classifier.heads[task](feature)
            loss = F.cross_entropy(logits.float(), labels)
            step_grads = torch.autograd.grad(loss, params[k], retain_graph=k + 1 < len(surrogates),
                                             allow_unused=True)
            grads[k].append(flatten_gradients(step_grads, params[k]))
            losses[k].append(loss.detach())
    tasks = [t for t, _, _ in task_batches]
    return [(torch.stack(g), tasks, torch.stack(lo).sum()) for g, lo in zip(grads, losses)]


def flatten_gradients(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """One flat vector of `grads` in the order of `params` (zeros where a parameter was not reached)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def projected_update(surrogate: Surrogate, optimizer: Optimizer, grads: Tensor, tasks: Sequence[int],
                     dominant: int) -> None:
    """Apply the task-dominant merge of `grads` (rows for `tasks`) with the surrogate's optimizer.
    Without a row for `dominant` (no labelled row for it), the plain sum is applied."""
    merged = task_dominant_projection(grads, list(tasks).index(dominant)) if dominant in tasks else grads.sum(0)
    offset = 0
    for p in surrogate.parameters():
        if p.requires_grad:
            p.grad = merged[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def feature_distance(a: Tensor, b: Tensor, kind: str = "l2") -> Tensor:
    """Per-row distance of two feature batches [N, D] -> [N]: l2 (Euclidean), mse (mean squared
    difference) or cosine (1 - cosine similarity)."""
    if kind == "l2":
        return torch.linalg.vector_norm(a - b, dim=1)
    if kind == "mse":
        return (a - b).pow(2).mean(1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=1)
    raise ValueError(f"unknown feature distance {kind!r}; use one of {DISTANCES}")


def regularizer_gate(main_prob: Tensor, surrogate_prob: Tensor) -> Tensor:
    """True where the surrogate's probability of the true class exceeds 0.5 and the main network's
    probability for the same sample."""
    return (surrogate_prob > 0.5) & (surrogate_prob > main_prob)


def gated_feature_regularizer(main_feature: Tensor, surrogate_feature: Tensor, main_prob: Tensor,
                              surrogate_prob: Tensor, distance: str = "l2") -> Tuple[Tensor, Tensor]:
    """Mean distance of the main features [N, D] to the (fixed) surrogate features over the gated
    samples, 0 when none is gated. Returns (loss, gate [N] bool)."""
    gate = regularizer_gate(main_prob.detach(), surrogate_prob.detach())
    dist = feature_distance(main_feature.float(), surrogate_feature.detach().float(), distance)
    loss = torch.where(gate, dist, torch.zeros_like(dist)).sum() / gate.sum().clamp_min(1)
    return loss, gate
