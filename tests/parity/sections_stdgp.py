"""Fixture sections for STDGP and the objective, from the reference's `IGReg` methods: the
task-dominant projection, the uncertainty-weighted objective, the feature distances, the
regularizer gate and one surrogate step (stage 1) of each auxiliary classifier."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from parity.registry import save, section
from parity.seeded import pack_names_and_shapes, seeded_input, seeded_state

from scripts.networks.reference_weights import neck_classifier_map, rename

# the reference's surrogate k puts task k's loss first (G2: [t1, t0, t2], G3: [t2, t0, t1])
REFERENCE_ORDER = {0: [0, 1, 2], 1: [1, 0, 2], 2: [2, 0, 1]}
LABELS = [[0, 1], [1, 0], [1, 1]]  # per task, its two rows
LION = {"lr": 1e-4, "weight_decay": 2e-5}
STEP = {"weight_seed": 31, "feature_seed": 32, "spatial": (8, 4, 2, 2), "widths": (128, 256, 512, 512), "rows": 7}
GATE = {"main_seed": 41, "aux_seed": 42, "size": (32, 32, 32)}


def _bare_igreg(ref: SimpleNamespace):
    """An IGReg instance without its (large) submodules, to call its stateless methods."""
    return ref.IGReg.__new__(ref.IGReg)


@section("projection")
def projection(ref: SimpleNamespace, out_dir: Path) -> None:
    """`_task_guide_gradients_unconflict` on linear losses p . g_i (so the gradients are the g_i),
    each task dominant in turn, for conflicting, non-conflicting and mixed gradient sets."""
    gen = torch.Generator().manual_seed(21)
    base = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    cases = [base,                                                           # random signs
             torch.stack([base[0], -base[0] + 0.3 * base[1], -2 * base[0] + base[2]]),  # both conflict with g0
             torch.stack([base[0].abs(), base[1].abs(), base[2].abs()]),     # no conflict at all
             torch.stack([base[0], base[0] + base[1], -base[0] - 0.5 * base[2]])]  # g1 agrees, g2 conflicts
    igreg = _bare_igreg(ref)
    merged = torch.zeros(len(cases), 3, 16, dtype=torch.float64)
    for c, grads in enumerate(cases):
        for dom in range(3):
            p = torch.nn.Parameter(torch.zeros(16, dtype=torch.float64))
            optim = torch.optim.SGD([p], lr=0.0)
            losses = [(p * grads[t]).sum() for t in REFERENCE_ORDER[dom]]
            merged[c, dom] = igreg._task_guide_gradients_unconflict(losses, optim)[0].detach()
    save(out_dir, "projection", grads=torch.stack(cases), merged=merged)


@section("uncertainty")
def uncertainty(ref: SimpleNamespace, out_dir: Path) -> None:
    """`IGReg.forward` (step > 1) with its parts replaced by known values: the main branch returns
    fixed losses and features, the surrogates fixed features, the gate fixed states; what remains
    is the reference's own regularizer and Kendall-Gal sum, with non-zero log-variances."""
    gen = torch.Generator().manual_seed(22)
    log_vars = torch.tensor([0.3, -0.2, 0.5, -0.4, 0.1, 0.25])
    losses = torch.rand(5, generator=gen) + 0.2          # cls, seg, margin, het, align
    main_feats = torch.randn(6, 48, generator=gen)
    sur_feats = torch.randn(3, 6, 48, generator=gen)      # one feature batch per surrogate
    out = {}
    for case, states in {"some": [2, 0, 0, 2, 2, 0], "none": [0] * 6}.items():
        igreg = ref.IGReg.__new__(ref.IGReg)
        torch.nn.Module.__init__(igreg)
        for i, s in enumerate(log_vars, start=1):
            setattr(igreg, f"log_sigma{i}", torch.nn.Parameter(s.clone()))
        igreg.distance = "l2"
        branch = SimpleNamespace(get_m_features=lambda x: (x, x, x, x))
        dpa_out = (*losses, None, main_feats)
        igreg.__dict__["IGReg_DPA"] = _Callable(lambda *a: dpa_out, BranchMain=branch)
        for k in range(3):
            igreg.__dict__[f"G{k + 1}"] = _Callable(None, get_features=(lambda f: (lambda *a: f))(sur_feats[k]))
        state_iter = iter(states)
        igreg.get_prob = lambda *a, **kw: next(state_iter)
        cls = torch.zeros(6, 1)
        total = igreg.forward(cls, torch.zeros(1, 1), None, None, None, None, 0, None, None, None, step=2)
        out[f"total_{case}"] = total.detach()
        out[f"states_{case}"] = torch.tensor(states)
    save(out_dir, "uncertainty", log_vars=log_vars, losses=losses, main_feats=main_feats, sur_feats=sur_feats, **out)


class _Callable(torch.nn.Module):
    """A stand-in submodule: calling it returns `fn(*args)`; keyword attributes become attributes."""

    def __init__(self, fn, **attrs) -> None:
        super().__init__()
        self.fn = fn
        for k, v in attrs.items():
            self.__dict__[k] = v

    def forward(self, *args):
        return self.fn(*args)


@section("distances")
def distances(ref: SimpleNamespace, out_dir: Path) -> None:
    """`IGReg._feature_distance` per pair of vectors for mse and l2; the reference's cosine option
    calls an undefined `self.cosine` (recorded: it raises)."""
    gen = torch.Generator().manual_seed(23)
    a, b = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
    igreg = _bare_igreg(ref)
    values = {}
    for kind in ("mse", "l2"):
        igreg.distance = kind
        values[kind] = torch.stack([igreg._feature_distance(a[i], b[i]) for i in range(5)])
    igreg.distance = "cosine"
    try:
        igreg._feature_distance(a[0], b[0])
        cosine_error = ""
    except AttributeError as err:
        cosine_error = f"AttributeError: {err}"
    save(out_dir, "distances", a=a, b=b, mse=values["mse"], l2=values["l2"], cosine_error=np.array(cosine_error))


def _aux_state(ref: SimpleNamespace, seed: int) -> Dict[str, torch.Tensor]:
    aux = ref.Backbone_IGReg.AuxClassifer(n_classes=2, num_channels=24)
    return seeded_state([(k, v.shape) for k, v in aux.state_dict().items()], seed)


@section("surrogate_step")
def surrogate_step(ref: SimpleNamespace, out_dir: Path) -> None:
    """Stage 1 of `IGReg.forward` (step 1, the reference's code) on seeded encoder features: each
    surrogate G1/G2/G3 starts from its own seeded weights and takes one Lion step. Stored: the
    three task losses of each surrogate, the per-tensor norm of its merged gradient and the sign of
    its Lion step (2 bits a parameter), in the bundle's parameter names and order."""
    model = ref.IGReg(n_classes=2, num_channels=24, dim_proj=64, nc_pos=6, nc_neg=6, m=0.5)
    feats = [seeded_input((STEP["rows"], w, s, s, s), STEP["feature_seed"] + i)
             for i, (w, s) in enumerate(zip(STEP["widths"], STEP["spatial"]))]
    model.IGReg_DPA.BranchMain.get_m_features = lambda x: tuple(feats)
    states, optims = [], []
    for k in range(3):
        g = getattr(model, f"G{k + 1}")
        states.append(_aux_state(ref, STEP["weight_seed"] + k))
        g.load_state_dict(states[-1])
        optims.append(Lion(filter(lambda p: p.requires_grad, g.parameters()), **LION))
    merged_seen: List[List[torch.Tensor]] = []
    original = model._task_guide_gradients_unconflict

    def record(loss_list, optim):
        merged_seen.append([g.detach().clone() for g in original(loss_list, optim)])
        return merged_seen[-1]

    losses_seen: List[List[float]] = []
    for k in range(3):
        g = getattr(model, f"G{k + 1}")
        g.forward = (lambda fwd: lambda *a: _record_losses(fwd(*a), losses_seen))(g.forward)
    model._task_guide_gradients_unconflict = record
    labels = torch.tensor(LABELS)
    for o in optims:
        o.zero_grad()
    model(torch.zeros(6, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1), labels, None, torch.nn.CrossEntropyLoss(),
          None, 0, *optims, step=1)
    for o in optims:
        o.step()
    out = {}
    rows = neck_classifier_map(3)
    for k in range(3):
        g = getattr(model, f"G{k + 1}")
        names = [n for n, _ in g.named_parameters()]
        after = {n: p.detach() for n, p in g.named_parameters()}
        step_sign = {n: torch.sign(states[k][n] * (1 - LION["lr"] * LION["weight_decay"]) - after[n]) for n in names}
        norms = {n: m.norm() for n, m in zip(names, merged_seen[k])}
        step_sign, _ = rename(step_sign, rows)
        norms, _ = rename(norms, rows)
        order = sorted(step_sign)
        signs = torch.cat([step_sign[n].reshape(-1) for n in order]).numpy()
        out[f"pos_{k}"] = np.packbits(signs > 0)
        out[f"neg_{k}"] = np.packbits(signs < 0)
        out[f"grad_norms_{k}"] = torch.stack([norms[n] for n in order])
        out[f"losses_{k}"] = torch.tensor(losses_seen[k])
        out[f"param_names_{k}"] = np.array(order)
    save(out_dir, "surrogate_step", labels=labels, **out, **{k: np.array(v) for k, v in STEP.items()},
         lr=LION["lr"], weight_decay=LION["weight_decay"], **pack_names_and_shapes(states[0]))


def _record_losses(losses, seen: List[List[float]]):
    seen.append([float(v) for v in losses])
    return losses


@section("gate")
def gate(ref: SimpleNamespace, out_dir: Path) -> None:
    """`IGReg.get_prob` (eval mode, seeded main and surrogate weights) for the six classification
    rows, on a batch of one image repeated (the reference's row-0 comparison is then harmless) and
    on a batch of different images (where it is not). Labels: each row's surrogate-preferred class,
    so that the surrogate's probability exceeds 0.5 and the comparison with the main branch decides."""
    model = ref.IGReg(n_classes=2, num_channels=24, dim_proj=64, nc_pos=6, nc_neg=6, m=0.5).eval()
    main_state = seeded_state([(k, v.shape) for k, v in model.IGReg_DPA.BranchMain.state_dict().items()],
                              GATE["main_seed"])
    model.IGReg_DPA.BranchMain.load_state_dict(main_state)
    aux_states = [_aux_state(ref, GATE["aux_seed"] + k) for k in range(3)]
    for k in range(3):
        getattr(model, f"G{k + 1}").load_state_dict(aux_states[k])
    out = {}
    for case in ("same", "differ"):
        for input_seed in range(100, 200):
            x = seeded_input((1 if case == "same" else 6, 2, *GATE["size"]), input_seed).expand(6, -1, -1, -1, -1)
            x = x.contiguous()
            with torch.no_grad():
                layers = model.IGReg_DPA.BranchMain.get_m_features(torch.cat((x, x[:1])))
                sur = [getattr(model, f"G{k + 1}").predictcls(*layers, k) for k in range(3)]
                labels = torch.stack([sur[k][2 * k:2 * k + 2].argmax(1) for k in range(3)])
                states = [model.get_prob(x, *layers, labels, t, i) for t in range(3) for i in range(2)]
                main = [F.softmax(model.predictcls(x, t), 1) for t in range(3)]
            own = [main[t][2 * t + i, labels[t, i]] < F.softmax(sur[t][2 * t + i], 0)[labels[t, i]]
                   for t in range(3) for i in range(2)]
            decided = torch.tensor(states) == 2
            differs = bool((decided != torch.stack(own)).any())
            if (case == "same") or (differs and decided.any()):
                break
        out.update({f"{case}_input_seed": input_seed, f"{case}_labels": labels, f"{case}_states": torch.tensor(states)})
    aux_names = pack_names_and_shapes(aux_states[0])
    save(out_dir, "gate", main_seed=GATE["main_seed"], aux_seed=GATE["aux_seed"], size=GATE["size"], **out,
         **pack_names_and_shapes(main_state), **{f"aux_{k}": v for k, v in aux_names.items()})
