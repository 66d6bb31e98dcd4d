"""Uncertainty weighting, PCGrad and CAGrad: the merge rules against hand computation, the
strategies on a tiny network and batch."""

import copy
import functools
import random

import numpy as np
import pytest
import torch
from conftest import TINY_NET

from scripts.mtl import STRATEGIES, build_strategy
from scripts.mtl.base import BatchLayout
from scripts.mtl.cagrad import CAGrad, cagrad, cagrad_weights
from scripts.mtl.gradients import all_task_losses, shared_parameters
from scripts.mtl.pcgrad import PCGrad, pcgrad
from scripts.mtl.uncertainty import UncertaintyOnly
from scripts.networks import IGRegNet

SGD = functools.partial(torch.optim.SGD, lr=0.1)
TASKS = ("1p19q", "idh", "grade")
SIZE = 32


def batch(seed=0):
    """Per task a class-0 and a class-1 row, then one segmentation row."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * len(TASKS)
    label = torch.full((n + 1, len(TASKS)), -1, dtype=torch.long)
    for t in range(len(TASKS)):
        label[2 * t:2 * t + 2, t] = torch.tensor([0, 1])
    seg = torch.zeros(n + 1, 1, SIZE, SIZE, SIZE)
    seg[-1, :, 8:20, 10:22, 6:18] = 1
    has_seg = torch.zeros(n + 1, dtype=torch.bool)
    has_seg[-1] = True
    return {"image": torch.randn(n + 1, 2, SIZE, SIZE, SIZE, generator=gen) + 2 * seg, "label": label, "seg": seg,
            "has_seg": has_seg}


def network():
    torch.manual_seed(0)
    return IGRegNet(tasks=TASKS, **TINY_NET)


def grads_at_step(strategy, data):
    """Run one step and return the parameters' gradients as the optimizer saw them."""
    seen = {}
    opt = strategy.optimizers[0]
    original = opt.step

    def spy(*args, **kwargs):
        seen.update({name: None if p.grad is None else p.grad.clone() for name, p in strategy.named_parameters()})
        return original(*args, **kwargs)

    opt.step = spy
    logs = strategy.step(data)
    return seen, logs


def reference_gradients(strategy, data):
    """Per-task gradients of the shared trunk [T, P] and the summed-loss gradient of every parameter."""
    out = strategy.forward_tasks(data, BatchLayout.of(data))
    losses = all_task_losses(out)
    shared = shared_parameters(strategy.network)
    rows = []
    for loss in losses:
        g = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, shared)]))
    total = torch.autograd.grad(sum(losses), list(strategy.network.parameters()), allow_unused=True)
    return torch.stack(rows), dict(zip((f"network.{n}" for n, _ in strategy.network.named_parameters()), total))


# ---- the merge rules --------------------------------------------------------------------------------
def test_pcgrad_two_tasks_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1 . g2 = -1: g1 -> (1, 0) + 1/2 (-1, 1) = (0.5, 0.5); g2 -> (-1, 1) + 1 (1, 0) = (0, 1)
    torch.testing.assert_close(pcgrad(g, [[1], [0]]), torch.tensor([0.5, 1.5]))
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(pcgrad(agree, [[1], [0]]), agree.sum(0))  # no conflict: the plain sum


def test_pcgrad_three_tasks_depends_on_the_order():
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])
    # g1 vs g3 (dot -1, |g3|^2 1.25): (1, 0) + 0.8 (-1, 0.5) = (0.2, 0.4), then no conflict with g2
    # g2 vs g3 (dot -0.5): (1, 1) + 0.4 (-1, 0.5) = (0.6, 1.2), no conflict with g1
    # g3 vs g1 first: (0, 0.5), which agrees with g2; g3 vs g2 first: (-0.75, 0.75), then vs g1: (0, 0.75)
    torch.testing.assert_close(pcgrad(g, [[1, 2], [0, 2], [0, 1]]), torch.tensor([0.8, 2.1]))
    torch.testing.assert_close(pcgrad(g, [[2, 1], [2, 0], [1, 0]]), torch.tensor([0.8, 2.35]))


def test_cagrad_orthogonal_tasks_by_hand():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # symmetric: w = (1/2, 1/2), g_w = g0 = (1/2, 1/2), lambda = c: d = (1 + c) g0 / (1 + c^2)
    np.testing.assert_allclose(cagrad_weights((g @ g.T).double().numpy(), 0.5), [0.5, 0.5], atol=1e-6)
    torch.testing.assert_close(cagrad(g, 0.5), torch.tensor([0.6, 0.6]), atol=1e-5, rtol=0)
    torch.testing.assert_close(cagrad(g, 0.0), torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cagrad(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.zeros(2))  # g0 = 0


def test_cagrad_matches_a_grid_search_of_its_dual():
    g = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    c = 0.5
    g0 = g.mean(0)
    w1 = torch.linspace(0, 1, 200001, dtype=torch.float64)
    gw = w1[:, None] * g[0] + (1 - w1[:, None]) * g[1]
    dual = gw @ g0 + c * g0.norm() * gw.norm(dim=1)
    best = gw[dual.argmin()]
    expected = (g0 + c * g0.norm() / best.norm() * best) / (1 + c * c)
    torch.testing.assert_close(cagrad(g, c), expected, atol=1e-5, rtol=0)


def test_cagrad_maximises_the_worst_task_improvement_in_its_ball():
    torch.manual_seed(1)
    g = torch.randn(4, 6, dtype=torch.float64)
    c = 0.5
    g0 = g.mean(0)
    d = cagrad(g, c) * (1 + c * c)
    assert float((d - g0).norm()) == pytest.approx(c * float(g0.norm()), rel=1e-6)  # on the ball's boundary
    u = torch.nn.functional.normalize(torch.randn(20000, 6, dtype=torch.float64), dim=1)
    others = g0 + c * g0.norm() * u
    assert (g @ d).min() >= (others @ g.T).min(1).values.max() - 1e-6


# ---- the strategies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uncertainty", "pcgrad", "cagrad"])
def test_one_step_changes_the_weights_and_logs_finite_scalars(name):
    strategy = build_strategy(name, network(), SGD)
    before = [p.detach().clone() for p in strategy.network.parameters()]
    logs = strategy.step(batch())
    assert {"loss", "cls", "seg", "cls_1p19q", "cls_idh", "cls_grade"} <= set(logs) and not strategy.skipped
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    shared = {id(p) for p in shared_parameters(strategy.network)}
    changed = [id(p) for b, p in zip(before, strategy.network.parameters()) if not torch.equal(b, p.detach())]
    assert shared & set(changed) and set(changed) - shared  # trunk and task-specific parts both move


def test_strategy_classes_are_registered():
    assert {"igreg", "igreg_no_dpa", "igreg_no_stdgp", "equal", "uncertainty", "pcgrad", "cagrad"} <= set(STRATEGIES)
    assert isinstance(build_strategy("pcgrad", network(), SGD), PCGrad)
    assert isinstance(build_strategy("cagrad", network(), SGD), CAGrad)


def test_uncertainty_weights_each_task_with_its_own_log_variance():
    strategy = build_strategy("uncertainty", network(), SGD)
    assert isinstance(strategy, UncertaintyOnly)
    assert strategy.weighting.names == ["cls_1p19q", "cls_idh", "cls_grade", "seg"]
    with torch.no_grad():
        strategy.weighting.log_vars.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    logs = strategy.step(batch())
    s = torch.tensor([0.0, 1.0, -1.0, 0.5])
    terms = torch.stack([logs["cls_1p19q"], logs["cls_idh"], logs["cls_grade"], logs["seg"]])
    torch.testing.assert_close(logs["loss"], (torch.exp(-s) * terms + s).sum())
    assert not torch.equal(strategy.weighting.log_vars.detach(), s)  # the log-variances are trained too
    assert any(k.startswith("weighting.log_vars") for k in strategy.state_dict())


def test_pcgrad_step_applies_the_projection_to_the_trunk_and_the_sum_elsewhere():
    strategy = PCGrad(network(), SGD)
    data = batch()
    g, total = reference_gradients(copy.deepcopy(strategy), data)
    random.seed(3)
    seen, _ = grads_at_step(strategy, data)
    random.seed(3)
    orders = [random.sample([j for j in range(4) if j != i], 3) for i in range(4)]
    expected = pcgrad(g, orders)
    shared = {id(p) for p in shared_parameters(strategy.network)}
    got = torch.cat([seen[n].reshape(-1) for n, p in strategy.named_parameters() if id(p) in shared])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, g.sum(0), rtol=1e-3, atol=1e-6)  # the tasks conflict on this batch
    for name in ("decoder.head.weight", "classifier.heads.1.weight", "classifier.down8.0.weight"):
        name = f"network.{name}"
        torch.testing.assert_close(seen[name], total[name], rtol=1e-4, atol=1e-6)


def test_cagrad_without_radius_is_equal_weighting():
    strategy = CAGrad(network(), SGD, c=0.0)
    data = batch()
    _, total = reference_gradients(copy.deepcopy(strategy), data)
    seen, _ = grads_at_step(strategy, data)
    for name, grad in total.items():
        if grad is not None:
            torch.testing.assert_close(seen[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_non_finite_loss_skips_the_update():
    strategy = build_strategy("cagrad", network(), SGD)
    data = batch()
    data["image"][0, 0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in strategy.network.parameters()]
    strategy.step(data)
    assert strategy.skipped
    for b, p in zip(before, strategy.network.parameters()):
        torch.testing.assert_close(p.detach(), b)
