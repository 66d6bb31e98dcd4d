"""Strategies: IGReg (and its ablations) and equal weighting on tiny networks and batches."""

import functools

import lion_pytorch
import pytest
import torch
from conftest import TINY_NET as TINY

import scripts.mtl.igreg as igreg_module
from scripts.mtl import build_strategy
from scripts.mtl.base import BatchLayout
from scripts.mtl.equal import EqualWeighting
from scripts.mtl.igreg import TERMS, IGReg
from scripts.networks import IGRegNet
from scripts.objective import UncertaintyWeighting, dice_loss
from scripts.stdgp import synced_task_gradients, task_dominant_projection, task_gradients

LION = functools.partial(lion_pytorch.Lion, lr=1e-3, weight_decay=2e-5)
SIZE = 32


def training_batch(tasks=2, per_class=1, seed=0):
    """Task 0's rows (class 0 then 1), task 1's rows, ..., then one segmentation row."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * per_class * tasks
    label = torch.full((n + 1, tasks), -1, dtype=torch.long)
    for t in range(tasks):
        rows = slice(2 * per_class * t, 2 * per_class * (t + 1))
        label[rows, t] = torch.tensor([0] * per_class + [1] * per_class)
    seg = torch.zeros(n + 1, 1, SIZE, SIZE, SIZE)
    seg[-1, :, 8:20, 10:22, 6:18] = 1
    has_seg = torch.zeros(n + 1, dtype=torch.bool)
    has_seg[-1] = True
    image = torch.randn(n + 1, 2, SIZE, SIZE, SIZE, generator=gen) + 2 * seg
    return {"image": image, "label": label, "seg": seg, "has_seg": has_seg}


def make(name="igreg", tasks=("idh", "grade"), **igreg):
    torch.manual_seed(0)
    options = {"proto_dim": 8, "nc_neg": 2, "nc_pos": 2, **igreg}
    return build_strategy(name, IGRegNet(tasks=tasks, **TINY), LION, igreg=options)


def plain_loss(strategy, batch):
    with torch.no_grad():
        out = strategy.forward_tasks(batch, BatchLayout.of(batch))
    return (torch.stack(out.task_losses).sum() + out.seg_loss).item()


def test_channels_last_stores_convolutions_channels_last_and_computes_the_same():
    plain = make()
    torch.manual_seed(0)
    converted = build_strategy("igreg", IGRegNet(tasks=("idh", "grade"), **TINY), LION,
                               igreg={"proto_dim": 8, "nc_neg": 2, "nc_pos": 2}, channels_last=True)
    convs = [m.weight for m in converted.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    batch = training_batch()
    torch.testing.assert_close(plain_loss(converted, batch), plain_loss(plain, batch), rtol=1e-4, atol=1e-5)
    before = [w.detach().clone() for w in convs]
    converted.step(batch)                                 # the optimizers hold the converted parameters
    assert not converted.skipped and any(not torch.equal(b, w) for b, w in zip(before, convs))


def test_layout_reads_rows():
    batch = training_batch(tasks=3)
    batch["label"][2, 0] = 1                             # a row labelled for two tasks
    layout = BatchLayout.of(batch)
    assert layout.task_rows == [[0, 1, 2], [2, 3], [4, 5]]
    assert layout.cls_rows == [0, 1, 2, 3, 4, 5] and layout.seg_rows == [6]
    assert layout.task_pos == [[0, 1, 2], [2, 3], [4, 5]]


@pytest.mark.parametrize("name", ["equal", "igreg"])
def test_steps_on_a_fixed_batch_lower_the_loss(name):
    strategy = make(name, surrogate_steps=1)
    batch = training_batch()
    strategy.initialize([batch])
    before = plain_loss(strategy, batch)
    for _ in range(3):
        logs = strategy.step(batch)
    assert plain_loss(strategy, batch) < before
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())


def test_ablation_switches():
    no_dpa, no_stdgp = make("igreg_no_dpa", surrogate_steps=1), make("igreg_no_stdgp")
    batch = training_batch()
    assert not hasattr(no_dpa, "dpa") and len(no_dpa.optimizers) == 3
    assert not hasattr(no_stdgp, "surrogates") and len(no_stdgp.optimizers) == 1
    assert set(no_dpa.step(batch)).isdisjoint({"margin", "heterogeneity", "align"})
    assert "feature_reg" not in no_stdgp.step(batch)
    assert no_stdgp.weighting.names == ["cls", "seg", "margin", "heterogeneity", "align"]


def test_optimizers_and_state():
    strategy = make()
    main = {id(p) for g in strategy.optimizers[0].param_groups for p in g["params"]}
    for surrogate, opt in zip(strategy.surrogates, strategy.optimizers[1:]):
        own = {id(p) for g in opt.param_groups for p in g["params"]}
        assert own == {id(p) for p in surrogate.parameters()} and own.isdisjoint(main)
    assert {id(strategy.dpa.prototypes), id(strategy.weighting.log_vars)} <= main
    keys = strategy.state_dict().keys()
    for prefix in ("network.", "surrogates.1.", "dpa.prototypes", "dpa.initialized", "weighting.log_vars"):
        assert any(k.startswith(prefix) for k in keys)
    with pytest.raises(ValueError, match="unknown strategy"):
        make("nope")
    with pytest.raises(ValueError, match="label columns"):
        strategy.step(training_batch(tasks=3))
    with pytest.raises(ValueError, match="feature_distance"):
        IGReg(IGRegNet(**TINY), LION, feature_distance="manhattan")


def test_initialize_runs_once():
    strategy = make()
    batch = training_batch()
    before = strategy.dpa.prototypes.detach().clone()
    strategy.initialize([batch, batch])
    after = strategy.dpa.prototypes.detach().clone()
    assert strategy.dpa.initialized and not torch.allclose(before, after)
    strategy.initialize([batch])
    torch.testing.assert_close(strategy.dpa.prototypes.detach(), after)
    no_seg = {**batch, "has_seg": torch.zeros(7, dtype=torch.bool)}
    with pytest.raises(ValueError, match="no segmentation case"):
        make().initialize([no_seg])


@pytest.mark.parametrize("warmup", [0, 2])
def test_prototypes_stay_equal_until_the_warmup_ends_then_take_the_kmeans_centers(warmup):
    """The reference's schedule: prototypes start all equal and are trained as parameters for
    `prototype_warmup` iterations; then k-means runs once, on the network trained so far."""
    from ignite.engine import Events

    from scripts.engine import IGRegTrainer

    strategy = make(surrogate_steps=1, prototype_warmup=warmup)
    assert torch.equal(strategy.dpa.prototypes, torch.ones_like(strategy.dpa.prototypes))
    assert strategy.initialization_due(warmup) and not strategy.initialization_due(warmup - 1)
    batches = [training_batch(seed=i) for i in range(4)]
    seen = []
    trainer = IGRegTrainer("cpu", 1, batches, strategy, epoch_length=4, prototype_loader=[batches[0]])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        (bool(strategy.dpa.initialized), strategy.dpa.prototypes.detach().clone())))
    kmeans_weights = []
    initialize = strategy.initialize
    strategy.initialize = lambda b: kmeans_weights.append(strategy.network.encoder.state_dict()) or initialize(b)
    trainer.run()
    assert [done for done, _ in seen] == [i >= warmup for i in range(4)]
    assert len(kmeans_weights) == 1                       # once, and never again
    assert not strategy.initialization_due(warmup + 5)
    if warmup:
        first = IGRegNet(tasks=("idh", "grade"), **TINY).encoder.state_dict()   # make() seeds the same net
        assert any(not torch.equal(first[k], v) for k, v in kmeans_weights[0].items())   # a trained network


def test_equal_prototypes_give_the_features_no_prototype_gradient():
    strategy = make(surrogate_steps=1)
    z = torch.randn(2, 8, 3, 3, 3, requires_grad=True)
    tumor = (torch.rand(1, 1, 3, 3, 3) > 0.5).float()
    margin, het = strategy.dpa.margin_heterogeneity(z[1:], tumor)
    align = strategy.dpa.alignment_loss(z, 1.0)
    (margin + het + align).backward()
    assert z.grad.abs().max() < 1e-6


def test_main_update_changes_no_surrogate_parameter_and_logs_every_term():
    strategy = make(surrogate_steps=1)
    batch = training_batch()
    main_opt = strategy.optimizers[0]
    seen = {}
    original = main_opt.step

    def spy(*args, **kwargs):
        seen["before"] = [p.detach().clone() for p in strategy.surrogates.parameters()]
        seen["grads"] = [p.grad for p in strategy.surrogates.parameters()]
        seen["net"] = [p.detach().clone() for p in strategy.network.parameters()]
        result = original(*args, **kwargs)
        seen["after"] = [p.detach().clone() for p in strategy.surrogates.parameters()]
        return result

    main_opt.step = spy
    logs = strategy.step(batch)
    assert set(TERMS) <= set(logs) and {"loss", "surrogate", "gated", "cls_idh", "cls_grade"} <= set(logs)
    assert strategy.weighting.names == list(TERMS)
    assert all(g is None for g in seen["grads"])
    for b, a in zip(seen["before"], seen["after"]):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(b, a) for b, a in zip(seen["net"], strategy.network.parameters()))


def test_surrogate_update_changes_only_surrogates_each_around_its_task():
    torch.manual_seed(0)
    strategy = IGReg(IGRegNet(tasks=("idh", "grade"), **TINY), functools.partial(torch.optim.SGD, lr=1.0),
                     use_dpa=False)
    batch = training_batch()
    layout = BatchLayout.of(batch)
    out = strategy.forward_tasks(batch, layout)
    net_before = [p.detach().clone() for p in strategy.network.parameters()]
    strategy.sync_surrogates()
    starts = [torch.cat([p.detach().reshape(-1) for p in s.parameters()]) for s in strategy.surrogates]
    batches = strategy.task_batches(out.features, batch["label"], layout.task_rows)
    grads = [task_gradients(s, batches)[0] for s in strategy.surrogates]   # each with its own heads
    assert not torch.allclose(grads[0], grads[1])
    strategy.surrogate_update(batches)
    for b, p in zip(net_before, strategy.network.parameters()):
        torch.testing.assert_close(p.detach(), b)
    for k, s in enumerate(strategy.surrogates):
        now = torch.cat([p.detach().reshape(-1) for p in s.parameters()])
        torch.testing.assert_close(now - starts[k], -task_dominant_projection(grads[k], k))


def test_only_the_first_surrogate_step_after_the_copy_shares_the_forward(monkeypatch):
    strategy = make(surrogate_steps=2)
    calls = []
    monkeypatch.setattr(igreg_module, "synced_task_gradients",
                        lambda *a, **k: calls.append("synced") or synced_task_gradients(*a, **k))
    monkeypatch.setattr(igreg_module, "task_gradients", lambda *a, **k: calls.append("own") or task_gradients(*a, **k))
    strategy.train()
    strategy.step(training_batch())
    assert calls == ["synced"] + ["own"] * len(strategy.surrogates)      # the second step: surrogates differ
    assert not strategy.surrogates_synced


def with_parts(*batches):
    """Batches stacked as one step's batch, the rows of batch p tagged with part p."""
    joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    joined["part"] = torch.cat([torch.full((len(b["label"]),), p) for p, b in enumerate(batches)])
    return joined


def test_surrogate_steps_train_on_their_own_batches_and_the_gate_on_the_main_one():
    strategy = make(surrogate_steps=2)
    assert strategy.surrogate_batches == 2
    assert make("igreg_no_stdgp").surrogate_batches == 0 and make("equal").surrogate_batches == 0
    main, first, second = (training_batch(seed=s) for s in (0, 1, 2))
    first["image"][:, :, :4] += 3.0                      # parts that differ visibly from the main batch
    second["label"][:2, 0] = -1                          # the second surrogate batch lacks task idh
    seen = []
    update = strategy.surrogate_update
    strategy.surrogate_update = lambda batches: seen.append(batches) or update(batches)
    regularize = strategy.feature_regularizer
    gated = []
    strategy.feature_regularizer = lambda out, batches, lay: gated.append(batches) or regularize(out, batches, lay)
    strategy.train()
    with torch.no_grad():       # all of part 1 through the encoder: BatchNorm over the whole batch, as the reference
        expected = strategy.network.encoder(first["image"])
    strategy.step(with_parts(main, first, second))
    assert len(seen) == 2 and [t for t, _, _ in seen[0]] == [0, 1] and [t for t, _, _ in seen[1]] == [1]
    torch.testing.assert_close(seen[0][0][1][0], expected[0][:2])
    torch.testing.assert_close(seen[0][1][2], first["label"][2:4, 1])
    assert len(gated) == 1 and torch.equal(gated[0][1][2], main["label"][2:4, 1])
    assert gated[0][0][1][0].shape[0] == 2               # the main batch's rows only, not the parts'


def test_surrogates_keep_their_own_heads_and_take_the_rest_of_the_classification_path():
    """As the reference's copy_param: neck and classification branch copied each outer iteration,
    the task heads never; they start apart from the network's and only surrogate steps train them."""
    strategy = make(surrogate_steps=1)
    net_heads = strategy.network.classifier.heads.state_dict()
    heads = [{k: v.clone() for k, v in s.classifier.heads.state_dict().items()} for s in strategy.surrogates]
    for own in heads:
        assert all(not torch.equal(own[k], net_heads[k]) for k in own)
    assert not torch.equal(heads[0]["0.weight"], heads[1]["0.weight"])
    strategy.step(training_batch())
    for s, own in zip(strategy.surrogates, heads):
        assert any(not torch.equal(v, own[k]) for k, v in s.classifier.heads.state_dict().items())  # trained
        trained = {k: v.clone() for k, v in s.classifier.heads.state_dict().items()}
        s.load_from(strategy.network)
        for k, v in s.classifier.heads.state_dict().items():
            torch.testing.assert_close(v, trained[k])            # the copy leaves them alone
        for (name, mine), theirs in zip(s.neck.state_dict().items(), strategy.network.neck.state_dict().values()):
            torch.testing.assert_close(mine, theirs)
        gate = s.classifier.gate8.state_dict()
        for k, v in strategy.network.classifier.gate8.state_dict().items():
            torch.testing.assert_close(gate[k], v)


def test_missing_labels_and_masks_contribute_nothing():
    strategy = make(surrogate_steps=1)
    batch = training_batch()
    batch["label"][2:4, 1] = -1                          # task grade without any labelled row
    logs = strategy.step(batch)
    assert logs["cls_grade"] == 0 and all(torch.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p).all() for p in strategy.parameters())

    strategy.network.eval()                              # rows independent: BatchNorm on running statistics
    base = training_batch()
    junk = {**base, "seg": base["seg"].clone(), "image": base["image"].clone()}
    junk["seg"][0] = 1.0                                 # a mask on a row without has_seg
    junk["label"][2, 1] = -1                             # an unlabelled row ...
    junk["image"][2] = 50.0                              # ... whose image changes
    ref = training_batch()
    ref["label"][2, 1] = -1
    with torch.no_grad():
        out_ref = strategy.forward_tasks(ref, BatchLayout.of(ref))
        out_junk = strategy.forward_tasks(junk, BatchLayout.of(junk))
    torch.testing.assert_close(out_junk.seg_loss, out_ref.seg_loss)
    torch.testing.assert_close(out_junk.task_losses[1], out_ref.task_losses[1])


def test_equal_weighting_is_sum_of_terms():
    strategy = make("equal")
    assert isinstance(strategy, EqualWeighting) and len(strategy.optimizers) == 1
    batch = training_batch(tasks=2, per_class=2)
    strategy = EqualWeighting(IGRegNet(tasks=("idh", "grade"), **TINY), LION)
    logs = strategy.step(batch)
    torch.testing.assert_close(logs["loss"], logs["cls"] + logs["seg"])
    torch.testing.assert_close(logs["cls"], logs["cls_idh"] + logs["cls_grade"])


def test_uncertainty_weighting_and_dice():
    weighting = UncertaintyWeighting(["a", "b", "c"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.0, 1.0, 2.0]))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0), "c": torch.tensor(4.0)}
    full = weighting(losses)
    torch.testing.assert_close(full, 2.0 + 3.0 * torch.exp(torch.tensor(-1.0)) + 1.0 + 4.0 * torch.exp(
        torch.tensor(-2.0)) + 2.0)
    torch.testing.assert_close(weighting(losses, {"b": False, "c": torch.tensor(False)}), torch.tensor(2.0))
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[..., :2, :, :] = 1
    perfect = torch.cat((-20 * mask, 20 * mask), 1) + torch.cat((20 * (1 - mask), -20 * (1 - mask)), 1)
    assert dice_loss(perfect, mask) < 1e-4 and dice_loss(-perfect, mask) > 0.99
