"""Whole outer iterations of IGReg, the reference's and the bundle's, from the same start on the same batches.

The reference side calls the authors' own methods in the order of their training loop (stage 0
`copy_param`, stage 1 `forward(step=1)` + the three surrogate Lion steps, `modify_step` times, stage 2
`forward(step=2)` + the main Lion step); the bundle side calls `IGReg.step` on one batch holding the
same main and surrogate batches as parts. Both start from the same weights: the reference model's
own seeded initialisation, copied into the bundle through `load_reference_weights`.

To make the two compute the same thing, the reference runs with what the bundle documents as its
differences applied from outside, and with its random draws recorded and replayed in the bundle:

- DPA at the feature grid: the reference's hard-coded upsampling of the projected pair goes to the
  grid's own size (an identity) and its prototype losses see the mask on that grid (`reference.dpa_size`);
  the mask is constant on the stride-4 blocks, so the bundle's tumour fractions are exactly 0 or 1;
- the gate (defect 1 of the reference): case n's surrogate probability is compared with the main
  network's probability for case n on the main batch, not case 0's;
- the alignment's voxels (`torch.randperm` inside `get_cluster_loss`) and the pair's classification
  case (`rand_idx`) are recorded in the reference and handed to the bundle (its pair is stacked the
  other way round: segmentation case first).
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from parity import reference
from torch import Tensor

from scripts.mtl.igreg import IGReg
from scripts.networks import IGRegNet, load_reference_surrogate_weights, load_reference_weights

WIDE = dict(num_channels=24, depths=(3, 4, 6, 3), widths=(128, 256, 512, 512), cardinality=32, pooling="avg")
LION = dict(lr=1e-4, weight_decay=2e-5)
STRIDE = 4  # of the decoder feature M_t that DPA works on
SURROGATE_STEPS = 2  # the reference's `modify_step`


@dataclass
class LoopSetup:
    """Inputs of the comparison: per outer iteration `SURROGATE_STEPS` surrogate batches then the main
    batch, each `(cls images [6, 2, *S], seg image [1, 2, *S], labels [3, 2], mask [1, *S])`."""

    size: tuple
    batches: List[List[tuple]]
    rand_idx: List[int]
    seed: int


@dataclass
class LoopRecord:
    """What one side did: parameters after each iteration (bundle names), and the reference's draws."""

    params: List[Dict[str, Tensor]] = field(default_factory=list)
    perms: List[Tensor] = field(default_factory=list)
    gates: List = field(default_factory=list)
    starts: List[tuple] = field(default_factory=list)  # reference: (state dict, Lion momenta) before each iteration


def make_setup(iterations: int = 3, size: int = 32, seed: int = 7) -> LoopSetup:
    """Seeded batches: images N(0, 1), labels with both classes per task, a block-constant tumour mask."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(iterations):
        parts = []
        for _ in range(SURROGATE_STEPS + 1):
            cls = torch.randn(6, 2, size, size, size, generator=gen)
            seg = torch.randn(1, 2, size, size, size, generator=gen)
            labels = torch.stack([torch.randperm(2, generator=gen) for _ in range(3)])
            blocks = (torch.rand(1, *(3 * [size // STRIDE]), generator=gen) > 0.7).float()
            mask = blocks.repeat_interleave(STRIDE, 1).repeat_interleave(STRIDE, 2).repeat_interleave(STRIDE, 3)
            parts.append((cls, seg, labels, mask))
        batches.append(parts)
    rand_idx = [int(torch.randint(0, 6, (1,), generator=gen)) for _ in range(iterations)]
    return LoopSetup((size,) * 3, batches, rand_idx, seed)


# ---- the reference ----------------------------------------------------------------------------------
def reference_model(ref, seed: int):
    """The reference's IGReg with its own seeded initialisation, prototypes distinct (as after its
    k-means, `init` set) and non-zero log-variances."""
    torch.manual_seed(seed)
    model = ref.IGReg(n_classes=2, num_channels=24, dim_proj=64, nc_pos=6, nc_neg=6, m=0.5, distance="l2")
    cluster = model.IGReg_DPA.PropCluster.Clusterfunction
    with torch.no_grad():
        cluster.cluster.copy_(torch.randn(cluster.cluster.shape))
        for i, s in enumerate([0.2, -0.1, 0.3, -0.2, 0.1, 0.15], start=1):
            getattr(model, f"log_sigma{i}").fill_(s)
    cluster.init = True
    return model


def _onehot(mask: Tensor) -> Tensor:
    return torch.cat((1 - mask, mask))[None]


@contextmanager
def _reference_patches(model, ref_record: LoopRecord, grid: List[int]) -> Iterator[None]:
    """The bundle's documented differences applied to the reference (see the module docstring), and
    the alignment draws recorded."""
    prop = model.IGReg_DPA.PropCluster
    prop_forward, randperm = prop.forward, torch.randperm
    gates: List[int] = []

    def prop_at_grid(pair, seg_onehot, ce, dice):
        return prop_forward(pair, seg_onehot[:, :, ::STRIDE, ::STRIDE, ::STRIDE], ce, dice)

    def recorded_randperm(n, *args, **kwargs):
        perm = randperm(n, *args, **kwargs)
        ref_record.perms.append(perm.clone())
        return perm

    def own_row_gate(cls_inputs, layer1, layer2, layer3, layer4, label_list, cls_index, i_sample):
        with torch.no_grad():
            aux = getattr(model, f"G{cls_index + 1}").predictcls(layer1, layer2, layer3, layer4, cls_index)
            label = label_list[cls_index][i_sample]
            prob_aux = F.softmax(aux[2 * cls_index + i_sample], 0)[label]
            main = model.IGReg_DPA.BranchMain.predictcls(model._x_cat, cls_index)
            prob_main = F.softmax(main[2 * cls_index + i_sample], 0)[label]
        state = 2 if (prob_main < prob_aux and prob_aux > 0.5) else 0
        gates.append(state)
        return state

    prop.forward = prop_at_grid
    model.get_prob = own_row_gate
    torch.randperm = recorded_randperm
    try:
        with reference.dpa_size(grid):
            yield
    finally:
        torch.randperm = randperm
        prop.forward = prop_forward
        del model.get_prob
        ref_record.gates.append(gates)


def run_reference(ref, setup: LoopSetup) -> tuple:
    """The reference's outer iterations; returns (record, initial model state)."""
    model = reference_model(ref, setup.seed)
    model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optim_main = Lion(filter(lambda p: p.requires_grad, model.parameters()), **LION)
    optims = [Lion(filter(lambda p: p.requires_grad, getattr(model, f"G{k}").parameters()), **LION) for k in (1, 2, 3)]
    ce = torch.nn.CrossEntropyLoss(reduction="mean")
    dice = ref.loss_utiles.SoftDiceLoss(smooth=1e-5, do_bg=False)
    grid = [s // STRIDE for s in setup.size]
    record = LoopRecord()
    for it, parts in enumerate(setup.batches):
        record.starts.append(_snapshot(model, [optim_main, *optims]))
        for g in (model.G1, model.G2, model.G3):
            model.copy_param(g, model.IGReg_DPA.BranchMain)
        for cls, seg, labels, mask in parts[:SURROGATE_STEPS]:
            for o in optims:
                o.zero_grad()
            model(cls, seg, labels, _onehot(mask), ce, dice, setup.rand_idx[it], *optims, step=1)
            for o in optims:
                o.step()
        cls, seg, labels, mask = parts[SURROGATE_STEPS]
        model._x_cat = torch.cat((cls, seg))
        optim_main.zero_grad()
        with _reference_patches(model, record, grid):
            loss = model(cls, seg, labels, _onehot(mask), ce, dice, setup.rand_idx[it], None, None, None, step=2)
        loss.backward()
        optim_main.step()
        del model._x_cat
        record.params.append(bundle_names(model.state_dict()))
    return record, start


def _snapshot(model, optimizers) -> tuple:
    """The model's state dict and, in the same names, every parameter's Lion momentum (zero where none)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = dict(state)
    owner = {id(p): opt for opt in optimizers for group in opt.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        saved = owner[id(p)].state.get(p, {}) if id(p) in owner else {}
        momenta[name] = saved["exp_avg"].clone() if "exp_avg" in saved else torch.zeros_like(p)
    return state, momenta


_NAMER: List[IGReg] = []  # one strategy, built once, to map reference names onto the bundle's


def bundle_names(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A reference IGReg state dict's parameters under the bundle strategy's parameter names."""
    if not _NAMER:
        _NAMER.append(bundle_strategy())
    copy_reference_into_bundle(state, _NAMER[0])
    return {n: p.detach().clone() for n, p in _NAMER[0].named_parameters()}


def group_of(name: str) -> str:
    """The part of the strategy a parameter belongs to: network.encoder, surrogates.0, dpa.prototypes, ..."""
    return ".".join(name.split(".")[:2])


def compare(reference_params: Dict[str, Tensor], bundle_params: Dict[str, Tensor], lr: float) -> dict:
    """Per group: parameters, coordinates whose Lion step differs from the reference's (|difference| >
    lr / 2: a step of the other sign, or none), and the largest deviation of the other coordinates
    relative to the tensor's largest reference value."""
    out: dict = {}
    for name, ref in reference_params.items():
        diff = (bundle_params[name] - ref).abs()
        flipped = diff > lr / 2
        same = diff[~flipped]
        rel = float(same.max() / ref.abs().max().clamp_min(1e-12)) if same.numel() else 0.0
        row = out.setdefault(group_of(name), {"params": 0, "flipped": 0, "rel": 0.0})
        row["params"] += ref.numel()
        row["flipped"] += int(flipped.sum())
        row["rel"] = max(row["rel"], rel)
    return out


# ---- the bundle -------------------------------------------------------------------------------------
def bundle_strategy(align_fraction: float = 1.0) -> IGReg:
    """The bundle's IGReg with the reference's sizes and optimizer settings (constant learning rate)."""
    network = IGRegNet(**WIDE)
    return IGReg(network, partial(Lion, **LION), use_dpa=True, use_stdgp=True, surrogate_steps=SURROGATE_STEPS,
                 nc_neg=6, nc_pos=6, proto_dim=64, temperature=0.01, margin=0.5, align_fraction=align_fraction,
                 feature_distance="l2", prototype_warmup=0, kmeans="reference")


def _part(prefix: str, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def copy_reference_into_bundle(state: Dict[str, Tensor], strategy: IGReg) -> None:
    """Every weight of the reference's IGReg state dict into the bundle strategy."""
    load_reference_weights(strategy.network, _part("IGReg_DPA.BranchMain.", state))
    for k, surrogate in enumerate(strategy.surrogates, start=1):
        load_reference_surrogate_weights(surrogate, _part(f"G{k}.", state))
    strategy.dpa.proj.weight.copy_(state["IGReg_DPA.proj.weight"])
    strategy.dpa.proj.bias.copy_(state["IGReg_DPA.proj.bias"])
    strategy.dpa.prototypes.copy_(state["IGReg_DPA.PropCluster.Clusterfunction.cluster"])
    strategy.dpa.initialized.fill_(True)
    strategy.weighting.log_vars.copy_(torch.stack([state[f"log_sigma{i}"] for i in range(1, 7)]))


def bundle_batch(parts: List[tuple]) -> dict:
    """One bundle batch: part 0 the main batch (the reference's stage-2 batch), parts 1.. the surrogate
    batches in the reference's order; rows per part: 2 cases per task, then the segmentation case."""
    order = [parts[SURROGATE_STEPS], *parts[:SURROGATE_STEPS]]
    images, labels, segs, has_seg, part = [], [], [], [], []
    for p, (cls, seg, lab, mask) in enumerate(order):
        images += [cls, seg]
        rows = torch.full((7, 3), -1, dtype=torch.long)
        for t in range(3):
            rows[2 * t:2 * t + 2, t] = lab[t]
        labels.append(rows)
        segs.append(torch.cat((torch.zeros(6, 1, *mask.shape[1:]), mask[None])))
        has_seg.append(torch.tensor([False] * 6 + [True]))
        part.append(torch.full((7,), p))
    return {"image": torch.cat(images), "label": torch.cat(labels), "seg": torch.cat(segs),
            "has_seg": torch.cat(has_seg), "part": torch.cat(part)}


@contextmanager
def _replayed_draws(perm: Tensor, cls_row: int, voxels: int) -> Iterator[None]:
    """The bundle's alignment voxels and pair case as the reference drew them (its pair is stacked
    classification case first, the bundle's segmentation case first)."""
    randperm, randrange = torch.randperm, random.randrange
    swapped = torch.where(perm < voxels, perm + voxels, perm - voxels)
    torch.randperm = lambda n, *a, **kw: swapped.clone()
    random.randrange = lambda n: cls_row
    try:
        yield
    finally:
        torch.randperm, random.randrange = randperm, randrange


def _alignment_fraction(setup: LoopSetup) -> tuple:
    """(grid voxels of one volume, the `align_fraction` that draws as many alignment voxels as the
    reference draws from the pair at the grid: (2 V) // 64)."""
    grid = [s // STRIDE for s in setup.size]
    voxels = grid[0] * grid[1] * grid[2]
    full = setup.size[0] * setup.size[1] * setup.size[2]
    return voxels, (2 * voxels // 64) / (2 * voxels * full / voxels)


def run_bundle_each(setup: LoopSetup, ref_record: LoopRecord, perturbation: float = 0.0) -> LoopRecord:
    """Each outer iteration of the bundle from the reference's state before it (weights and Lion
    momenta), with the reference's draws; `perturbation` scales that state by (1 + perturbation) to
    measure how far float rounding alone moves one iteration's Lion signs."""
    voxels, fraction = _alignment_fraction(setup)
    record = LoopRecord()
    for it, parts in enumerate(setup.batches):
        state, momenta = ref_record.starts[it]
        if perturbation:
            state = {k: v * (1 + perturbation) if v.is_floating_point() else v for k, v in state.items()}
        strategy = bundle_strategy(align_fraction=fraction)
        copy_reference_into_bundle(state, strategy)
        by_name = bundle_names(momenta)
        name_of = {id(p): n for n, p in strategy.named_parameters()}
        for opt in strategy.optimizers:
            for p in (q for group in opt.param_groups for q in group["params"]):
                opt.state[p]["exp_avg"] = by_name[name_of[id(p)]].clone()
        strategy.train()
        with _replayed_draws(ref_record.perms[it], setup.rand_idx[it], voxels):
            logs = strategy.step(bundle_batch(parts))
        record.gates.append(float(logs["gated"]))
        record.params.append({n: p.detach().clone() for n, p in strategy.named_parameters()})
    return record


def run_bundle(setup: LoopSetup, start: Dict[str, Tensor], ref_record: LoopRecord) -> LoopRecord:
    """The bundle's outer iterations from the reference's start, with the reference's draws."""
    voxels, fraction = _alignment_fraction(setup)
    strategy = bundle_strategy(align_fraction=fraction)
    copy_reference_into_bundle(start, strategy)
    strategy.train()
    record = LoopRecord()
    for it, parts in enumerate(setup.batches):
        with _replayed_draws(ref_record.perms[it], setup.rand_idx[it], voxels):
            logs = strategy.step(bundle_batch(parts))
        record.gates.append(float(logs["gated"]))
        record.params.append({n: p.detach().clone() for n, p in strategy.named_parameters()})
    return record


def main() -> None:
    """Print the comparison: each iteration from the reference's own state, the rounding floor (the
    same with that state scaled by 1 + 1e-7), and the three iterations carried by each side."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's deprecated upsample calls
    ref = reference.load()
    setup = make_setup()
    ref_record, start = run_reference(ref, setup)
    lr = LION["lr"]
    runs = {"bundle from the reference's state": run_bundle_each(setup, ref_record),
            "rounding floor (that state x (1 + 1e-7))": run_bundle_each(setup, ref_record, 1e-7)}
    carried = run_bundle(setup, start, ref_record)
    own = runs["bundle from the reference's state"]
    print(f"gated cases, reference: {ref_record.gates}; bundle (share of 6): {own.gates}")
    for it in range(len(setup.batches)):
        base = own.params[it]
        rows = {
            "bundle vs reference": compare(ref_record.params[it], base, lr),
            "floor: bundle vs bundle from a perturbed state": compare(
                base, runs["rounding floor (that state x (1 + 1e-7))"].params[it], lr),
            "carried: bundle vs reference after iterations 1..k": compare(
                ref_record.params[it], carried.params[it], lr),
        }
        for what, groups in rows.items():
            total = sum(g["params"] for g in groups.values())
            flipped = sum(g["flipped"] for g in groups.values())
            rel = max(g["rel"] for g in groups.values())
            print(f"iteration {it + 1}, {what}: {flipped} of {total} coordinates stepped otherwise "
                  f"({flipped / total:.1e}); others within {rel:.1e} relative")
