"""Gradient-conflict diagnostics: the statistics, the sign agreement of the applied update, the
measurement on a strategy, and the trainer handler."""

import csv
import functools
import math
import random

import pytest
import torch
from conftest import TINY_NET
from test_gradient_strategies import TASKS, batch

from scripts.diagnostics import GradientConflictLogger, conflict_stats, measure_conflicts, sign_agreement
from scripts.engine import IGRegTrainer
from scripts.mtl import build_strategy
from scripts.mtl.base import BatchLayout
from scripts.networks import IGRegNet

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def strategy(name="equal", tasks=TASKS):
    torch.manual_seed(0)
    return build_strategy(name, IGRegNet(tasks=tasks, **TINY_NET), SGD)


def with_seg_loss(s, sign):
    """Make the strategy's segmentation loss `sign` times its (single) classification loss."""
    original = s.forward_tasks

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.seg_loss = sign * out.task_losses[0]
        return out

    s.forward_tasks = forward
    return s


def test_conflict_stats_by_hand():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [0.0, 0.0]])
    stats = conflict_stats(g, ["a", "b", "c", "d"])
    torch.testing.assert_close(stats.norms, torch.tensor([1.0, 2.0, math.sqrt(2), 0.0]))
    assert stats.cosines[0, 1] == 0 and stats.cosines[0, 2] == pytest.approx(-1 / math.sqrt(2))
    assert math.isnan(stats.cosines[0, 3])                     # no cosine with a zero gradient
    assert stats.conflict_fraction == pytest.approx(2 / 3)     # (a, c) and (b, c) of the three defined pairs
    row = stats.row()
    assert list(row)[:5] == ["conflict_fraction", "norm_a", "norm_b", "norm_c", "norm_d"]
    assert row["cos_b_c"] == pytest.approx(-1 / math.sqrt(2)) and "cos_c_b" not in row


def test_sign_agreement_by_hand():
    grads = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 5.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    update = torch.tensor([-0.1, 0.5, 0.2, 0.0])               # descent of task a; the last coordinate did not move
    agree = sign_agreement(grads, update, ["a", "b", "c"])
    assert agree["sign_agree_a"] == 1.0                        # coordinates 0 and 1 (2: a's gradient is zero)
    assert agree["sign_agree_b"] == pytest.approx(1 / 3)       # of 0, 1, 2 only 1 agrees
    assert math.isnan(agree["sign_agree_c"])                   # no coordinate where both are non-zero


def test_sign_agreement_of_a_plain_sgd_step_follows_the_only_descent(tmp_path):
    """Total loss = idh - 0.5 idh (the seg loss set to -0.5 idh): SGD moves along -grad(idh), against seg."""
    s = strategy(tasks=("idh",))
    original = s.forward_tasks

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.seg_loss = -0.5 * out.task_losses[0]
        return out

    s.forward_tasks = forward
    data = batch()
    data["label"] = data["label"][:, 1:2]
    IGRegTrainer("cpu", max_epochs=1, train_data_loader=[data], strategy=s, epoch_length=1,
                 train_handlers=[GradientConflictLogger(s, 1, str(tmp_path))]).run()
    row = next(csv.DictReader(open(tmp_path / "gradient_conflicts.csv")))
    assert float(row["sign_agree_idh"]) == 1.0 and float(row["sign_agree_seg"]) == 0.0


@pytest.mark.parametrize("sign, fraction", [(-1.0, 1.0), (1.0, 0.0)])
def test_opposed_losses_conflict_and_identical_ones_do_not(sign, fraction):
    s = with_seg_loss(strategy(tasks=("idh",)), sign)
    data = batch()
    data["label"] = data["label"][:, 1:2]                      # only the idh column
    stats = measure_conflicts(s, data)
    assert stats.names == ["idh", "seg"] and stats.conflict_fraction == fraction
    assert stats.cosines[0, 1] == pytest.approx(sign, abs=1e-5)
    assert stats.norms[0] > 0 and stats.norms[0] == pytest.approx(float(stats.norms[1]), rel=1e-5)


def train(tmp_path, every, iterations=4):
    """A few PCGrad iterations (PCGrad draws from `random`) through the trainer; returns the final state."""
    s = strategy("pcgrad")
    random.seed(0)
    data = [batch(seed=i) for i in range(iterations)]
    handlers = [GradientConflictLogger(s, every, str(tmp_path))]
    IGRegTrainer("cpu", max_epochs=1, train_data_loader=data, strategy=s, epoch_length=iterations,
                 train_handlers=handlers).run()
    return s.state_dict(), (torch.get_rng_state(), random.getstate())


def test_logger_writes_csv_and_tensorboard_and_leaves_training_unchanged(tmp_path):
    logged, rng_logged = train(tmp_path / "on", every=2)
    plain, rng_plain = train(tmp_path / "off", every=0)
    for k in plain:                                            # weights, BatchNorm statistics included
        torch.testing.assert_close(logged[k], plain[k], rtol=0, atol=0, msg=k)
    assert torch.equal(rng_logged[0], rng_plain[0]) and rng_logged[1] == rng_plain[1]
    rows = list(csv.DictReader(open(tmp_path / "on" / "gradient_conflicts.csv")))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    assert {"conflict_fraction", "norm_1p19q", "norm_seg", "cos_1p19q_idh", "cos_grade_seg", "sign_agree_1p19q",
            "sign_agree_seg"} <= set(rows[0])
    assert all(0 <= float(r[f"sign_agree_{t}"]) <= 1 for r in rows for t in ("1p19q", "idh", "grade", "seg"))
    assert all(0 <= float(r["conflict_fraction"]) <= 1 and float(r["norm_seg"]) > 0 for r in rows)
    assert list((tmp_path / "on").glob("events.out.tfevents.*"))
    assert not (tmp_path / "off").exists()


def test_objective_terms_sum_to_the_loss_the_step_minimises(monkeypatch):
    """Equal: the terms are the plain losses; IGReg: the weighted terms plus the log-variances are its total."""
    data = batch()
    s = strategy("equal")
    terms = s.objective_terms(data)
    assert list(terms) == [*TASKS, "seg"]
    with torch.no_grad():
        expected = s.forward_tasks(data, BatchLayout.of(data))
    torch.testing.assert_close(sum(terms.values()), torch.stack(expected.task_losses).sum() + expected.seg_loss)

    torch.manual_seed(0)
    igreg = build_strategy("igreg_no_stdgp", IGRegNet(tasks=TASKS, **TINY_NET), SGD, igreg={"prototype_warmup": 0})
    with torch.no_grad():
        igreg.weighting.log_vars.copy_(torch.tensor([0.3, -0.2, 0.5, -0.4, 0.1]))
    monkeypatch.setattr(random, "randrange", lambda n: 0)    # the step's alignment pairs the first cls case too
    terms = igreg.objective_terms(data)
    assert list(terms) == [*TASKS, "seg", "align", "margin", "heterogeneity"]
    total = igreg.step(data)["loss"]
    torch.testing.assert_close(sum(terms.values()).detach() + torch.tensor([0.3, -0.2, 0.5, -0.4, 0.1]).sum(), total,
                               rtol=1e-5, atol=1e-5)


def test_logger_writes_each_terms_gradient_and_the_log_variances(tmp_path):
    torch.manual_seed(0)
    s = build_strategy("igreg", IGRegNet(tasks=TASKS, **TINY_NET), SGD, igreg={"surrogate_steps": 1})
    random.seed(0)
    IGRegTrainer("cpu", max_epochs=1, train_data_loader=[batch(seed=i) for i in range(2)], strategy=s,
                 epoch_length=2, train_handlers=[GradientConflictLogger(s, 1, str(tmp_path))]).run()
    rows = list(csv.DictReader(open(tmp_path / "gradient_conflicts.csv")))
    terms = [*TASKS, "seg", "align", "margin", "heterogeneity", "feature_reg"]
    assert {f"term_norm_{t}" for t in terms} | {f"term_sign_{t}" for t in terms} <= set(rows[0])
    assert {f"log_var_{n}" for n in ("cls", "seg", "margin", "heterogeneity", "align", "feature_reg")} <= set(rows[0])
    assert 0.0 != float(rows[0]["log_var_cls"]) != float(rows[1]["log_var_cls"])  # after each step: moved from 0
    assert all(float(r["term_norm_seg"]) > 0 and 0 <= float(r["term_sign_1p19q"]) <= 1 for r in rows)
