"""STDGP: task-dominant projection, the surrogate step and the gated feature regularizer."""

import pytest
import torch
from conftest import TINY_NET as TINY

from scripts.networks import IGRegNet
from scripts.stdgp import (
    Surrogate,
    feature_distance,
    gated_feature_regularizer,
    projected_update,
    regularizer_gate,
    synced_task_gradients,
    task_dominant_projection,
    task_gradients,
)


def reference_projection(grads, k):
    """Per-vector reading of the design: keep g_k, project each conflicting g_i off g_k, sum."""
    g_k = grads[k]
    out = []
    for i, g in enumerate(grads):
        if i != k and torch.dot(g, g_k) < 0:
            g = g - torch.dot(g, g_k) / torch.dot(g_k, g_k) * g_k
        out.append(g)
    return torch.stack(out).sum(0)


@pytest.mark.parametrize("tasks", [2, 3, 4, 5])
def test_projection_matches_per_vector_reference(tasks):
    gen = torch.Generator().manual_seed(tasks)
    for trial in range(20):
        grads = torch.randn(tasks, 50, generator=gen, dtype=torch.float64)
        k = trial % tasks
        torch.testing.assert_close(task_dominant_projection(grads, k), reference_projection(grads, k))


@pytest.mark.parametrize("tasks", [2, 3, 4, 5])
def test_conflicts_removed_and_agreeing_gradients_kept(tasks):
    gen = torch.Generator().manual_seed(10 + tasks)
    grads = torch.randn(tasks, 30, generator=gen, dtype=torch.float64)
    k = tasks - 1
    g_k = grads[k]
    grads[0] = -0.5 * g_k + 0.1 * grads[0]              # surely conflicting
    if tasks > 2:
        grads[1] = 0.5 * g_k + 0.1 * grads[1]           # surely agreeing
    for i in range(tasks - 1):
        # with two rows, the merge minus the dominant gradient is the other gradient after projection
        adjusted = task_dominant_projection(torch.stack((g_k, grads[i])), 0) - g_k
        if torch.dot(grads[i], g_k) < 0:
            assert torch.dot(adjusted, g_k) >= -1e-10
            assert torch.dot(adjusted, g_k).abs() < 1e-10
            assert not torch.allclose(adjusted, grads[i])
        else:
            torch.testing.assert_close(adjusted, grads[i])
    torch.testing.assert_close(task_dominant_projection(grads, k), reference_projection(grads, k))


def test_zero_dominant_gradient_leaves_others_unchanged():
    grads = torch.randn(4, 20)
    grads[2] = 0
    torch.testing.assert_close(task_dominant_projection(grads, 2), grads.sum(0))
    assert torch.isfinite(task_dominant_projection(grads, 2)).all()


def test_gate_fires_only_where_surrogate_is_confident_and_better():
    main_p = torch.tensor([0.30, 0.80, 0.30, 0.55])
    sur_p = torch.tensor([0.70, 0.70, 0.45, 0.60])
    assert regularizer_gate(main_p, sur_p).tolist() == [True, False, False, True]
    main_f = torch.zeros(4, 3, requires_grad=True)
    sur_f = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    loss, gate = gated_feature_regularizer(main_f, sur_f, main_p, sur_p, "l2")
    assert gate.tolist() == [True, False, False, True]
    assert loss.item() == pytest.approx((5.0 + 1.0) / 2)
    loss.backward()
    assert main_f.grad[1].abs().sum() == 0 and main_f.grad[2].abs().sum() == 0
    assert main_f.grad[0].abs().sum() > 0


def test_regularizer_without_gated_sample_is_zero_and_finite():
    main_f = torch.randn(3, 4, requires_grad=True)
    loss, gate = gated_feature_regularizer(main_f, main_f.detach().clone(), torch.full((3,), 0.9),
                                           torch.full((3,), 0.6))
    assert not gate.any() and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(main_f.grad).all()


def test_feature_distances():
    a, b = torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(feature_distance(a, b, "l2"), torch.tensor([2 ** 0.5, 5.0]))
    torch.testing.assert_close(feature_distance(a, b, "mse"), torch.tensor([1.0, 12.5]))
    torch.testing.assert_close(feature_distance(a, 2 * a, "cosine"), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        feature_distance(a, b, "manhattan")


def _task_batches(net, n_tasks=3):
    torch.manual_seed(1)
    with torch.no_grad():
        feats = net.encoder(torch.randn(2 * n_tasks, 2, 16, 16, 16))
    return [(t, [f[2 * t:2 * t + 2] for f in feats], torch.tensor([0, 1])) for t in range(n_tasks)]


def test_projected_update_changes_only_the_surrogate_and_applies_the_projected_gradient():
    torch.manual_seed(0)
    net = IGRegNet(**TINY)
    surrogate = Surrogate(net)
    batches = _task_batches(net)
    before_net = {k: v.clone() for k, v in net.state_dict().items()}
    before = [p.detach().clone() for p in surrogate.parameters()]
    grads, tasks, _ = task_gradients(surrogate, batches)
    expected = task_dominant_projection(grads, 1)
    projected_update(surrogate, torch.optim.SGD(surrogate.parameters(), lr=1.0), grads, tasks, 1)
    delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(surrogate.parameters(), before)])
    torch.testing.assert_close(delta, -expected)
    assert delta.abs().sum() > 0
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before_net[k])
    surrogate.load_from(net)
    for (name, p), b in zip(surrogate.named_parameters(), before):
        if not name.startswith("classifier.heads."):                  # the heads are the surrogate's own
            torch.testing.assert_close(p.detach(), b)


def test_task_gradient_sees_only_its_rows():
    torch.manual_seed(0)
    net = IGRegNet(**TINY)
    surrogate = Surrogate(net)
    batches = _task_batches(net)
    grads, tasks, _ = task_gradients(surrogate, batches)
    assert tasks == [0, 1, 2]
    changed = [batches[0], (1, [torch.randn_like(f) for f in batches[1][1]], batches[1][2]), batches[2]]
    grads2, _, _ = task_gradients(surrogate, changed)
    torch.testing.assert_close(grads2[0], grads[0])
    torch.testing.assert_close(grads2[2], grads[2])
    assert not torch.allclose(grads2[1], grads[1])


def test_synced_task_gradients_are_each_surrogates_own_to_the_bit():
    torch.manual_seed(0)
    net = IGRegNet(**TINY)
    surrogates = [Surrogate(net) for _ in range(3)]          # heads of their own, the rest copied from net
    for s in surrogates:
        s.load_from(net)
    batches = _task_batches(net)
    synced = synced_task_gradients(surrogates, batches)
    for s, (grads, tasks, loss) in zip(surrogates, synced):
        own_grads, own_tasks, own_loss = task_gradients(s, batches)   # its own forward and parameters
        assert torch.equal(grads, own_grads) and tasks == own_tasks and torch.equal(loss, own_loss)
    assert not torch.equal(synced[0][0], synced[1][0])                 # the heads differ, so do the gradients
