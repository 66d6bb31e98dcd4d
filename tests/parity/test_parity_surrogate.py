"""One STDGP surrogate step and the regularizer gate against the reference's `IGReg` (stage 1 with
Lion; `get_prob`), with the reference's seeded `AuxClassifer` / `Backbone` weights mapped in."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from parity.registry import load
from parity.seeded import seeded_input, seeded_state, unpack_names_and_shapes

from scripts.networks import IGRegNet, load_reference_surrogate_weights, load_reference_weights
from scripts.stdgp import Surrogate, projected_update, regularizer_gate, task_dominant_projection, task_gradients

WIDE = dict(num_channels=24, depths=(3, 4, 6, 3), widths=(128, 256, 512, 512), cardinality=32, pooling="avg")


@pytest.fixture(scope="module")
def network():
    return IGRegNet(**WIDE).eval()


def _unpack(fx, prefix: str = ""):
    return unpack_names_and_shapes({k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix + "state_")})


@pytest.mark.parametrize("dominant", [0, 1, 2])
def test_one_surrogate_step_matches_reference(network, dominant):
    fx = load("surrogate_step")
    names_and_shapes = unpack_names_and_shapes(fx)
    surrogate = Surrogate(network)
    load_reference_surrogate_weights(surrogate, seeded_state(names_and_shapes, int(fx["weight_seed"]) + dominant))
    before = {n: p.detach().clone() for n, p in surrogate.named_parameters()}
    feats = [seeded_input((int(fx["rows"]), int(w), int(s), int(s), int(s)), int(fx["feature_seed"]) + i)
             for i, (w, s) in enumerate(zip(fx["widths"], fx["spatial"]))]
    labels = torch.from_numpy(fx["labels"])
    batches = [(t, [f[2 * t:2 * t + 2] for f in feats], labels[t]) for t in range(3)]  # each task's own rows
    grads, tasks, loss_sum = task_gradients(surrogate, batches)
    assert loss_sum.item() == pytest.approx(float(fx[f"losses_{dominant}"].sum()), rel=1e-5)

    order = [str(n) for n in fx[f"param_names_{dominant}"]]
    params = dict(surrogate.named_parameters())
    assert sorted(params) == order
    merged = task_dominant_projection(grads, tasks.index(dominant))
    offsets, offset = {}, 0
    for n, p in surrogate.named_parameters():
        offsets[n] = (offset, p.numel())
        offset += p.numel()
    norms = torch.stack([merged[offsets[n][0]:sum(offsets[n])].norm() for n in order])
    reference_norms = torch.from_numpy(fx[f"grad_norms_{dominant}"])
    torch.testing.assert_close(norms, reference_norms, rtol=1e-4, atol=1e-5 * reference_norms.max().item())

    lr, wd = float(fx["lr"]), float(fx["weight_decay"])
    projected_update(surrogate, Lion(surrogate.parameters(), lr=lr, weight_decay=wd), grads, tasks, dominant)
    n_params = sum(before[n].numel() for n in order)
    sign = (np.unpackbits(fx[f"pos_{dominant}"])[:n_params].astype(np.float32)
            - np.unpackbits(fx[f"neg_{dominant}"])[:n_params].astype(np.float32))
    expected = torch.cat([before[n].reshape(-1) for n in order]) * (1 - lr * wd) - lr * torch.from_numpy(sign)
    after = torch.cat([params[n].detach().reshape(-1) for n in order])
    off = (after - expected).abs() > 1e-3 * lr
    assert off.sum().item() <= 1e-5 * n_params, f"{off.sum().item()} of {n_params} parameters stepped differently"
    assert (sign != 0).mean() > 0.9  # the step moved (almost) every parameter


def _gate_setup(network, fx):
    main_state = seeded_state(_unpack(fx), int(fx["main_seed"]))
    load_reference_weights(network, main_state)
    surrogates = []
    for k in range(3):
        s = Surrogate(network)
        load_reference_surrogate_weights(s, seeded_state(_unpack(fx, "aux_"), int(fx["aux_seed"]) + k))
        surrogates.append(s.eval())
    return surrogates


def _probabilities(network, surrogates, fx, case):
    n = 1 if case == "same" else 6
    x = seeded_input((n, 2, *fx["size"]), int(fx[f"{case}_input_seed"])).expand(6, -1, -1, -1, -1).contiguous()
    labels = torch.from_numpy(fx[f"{case}_labels"])
    main_prob, sur_prob, row0_prob = [], [], []
    with torch.no_grad():
        out, feats = network(x), network.encoder(x)
        for t, name in enumerate(network.tasks):
            scales, _ = surrogates[t].neck([f[2 * t:2 * t + 2] for f in feats])
            logits = surrogates[t].classifier(scales)[1][t]
            p_main = F.softmax(out[name], 1)
            for i in range(2):
                main_prob.append(p_main[2 * t + i, labels[t, i]])
                row0_prob.append(p_main[0, labels[t, i]])
                sur_prob.append(F.softmax(logits[i], 0)[labels[t, i]])
    return torch.stack(main_prob), torch.stack(sur_prob), torch.stack(row0_prob)


def test_gate_matches_reference_when_rows_share_one_image(network):
    fx = load("gate")
    surrogates = _gate_setup(network, fx)
    main_prob, sur_prob, _ = _probabilities(network, surrogates, fx, "same")
    reference = torch.from_numpy(fx["same_states"] == 2)
    assert reference.any() and not reference.all()
    assert torch.equal(regularizer_gate(main_prob, sur_prob), reference)


def test_gate_uses_each_rows_own_probability_where_reference_uses_row_0(network):
    # design defect 1: the reference compares with the main branch's probability for row 0
    fx = load("gate")
    surrogates = _gate_setup(network, fx)
    main_prob, sur_prob, row0_prob = _probabilities(network, surrogates, fx, "differ")
    reference = torch.from_numpy(fx["differ_states"] == 2)
    ours = regularizer_gate(main_prob, sur_prob)
    assert torch.equal(ours, (sur_prob > 0.5) & (sur_prob > main_prob))
    assert not torch.equal(ours, reference)
    assert torch.equal(regularizer_gate(row0_prob, sur_prob), reference)  # the reference's rule, reproduced
