"""Multi-task training strategies behind one interface: "given a batch, make one update".

Each strategy is an `nn.Module` that owns the network, its own extra state (surrogates, prototypes,
log-variances) and every optimizer, so one `state_dict()` and `optimizers` hold all of it.

Batch rows: `label[:, t] == -1` never contributes to task t; rows without `has_seg` never contribute
to the segmentation, margin or heterogeneity losses; a term without any contributing row is zero.
A batch may also hold the rows of IGReg's surrogate steps (`part` > 0, asked for through the
strategy's `surrogate_batches`); only part 0 is the main step's batch.
The row layout (and which rows belong to which part) is read to the host at the start of each step
(small transfers before any work is queued).
Every optimizer update is guarded: the update is skipped when a loss term or a gradient is not
finite (one small host read per update), and the names of the offending terms are left in
`strategy.skipped` for the trainer to count. Under torch.distributed the gradients are averaged
across ranks before that check, so every rank takes the same decision and the same update.
"""

from __future__ import annotations

import abc
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter
from torch.optim import Optimizer

from scripts.distributed import average_across_ranks, broadcast_module, rank, world_size
from scripts.dpa import KMEANS, PrototypeBank, VoxelPool, mask_to_grid
from scripts.networks import IGRegNet
from scripts.objective import UncertaintyWeighting, segmentation_loss
from scripts.stdgp import (
    DISTANCES,
    Surrogate,
    gated_feature_regularizer,
    projected_update,
    task_gradients,
)

OptimizerFactory = Callable[[Iterable[Parameter]], Optimizer]
TERMS = ("cls", "seg", "margin", "heterogeneity", "align", "feature_reg")


def average_with_terms(tensors: Sequence[Tensor], terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """`average_across_ranks(tensors)`, and `terms` to check: under torch.distributed with several
    ranks they gain "any_rank", NaN when a term of some rank is not finite, so that
    `non_finite_names` answers the same on every rank (the averaged tensors already agree)."""
    if world_size() == 1 or not terms:
        average_across_ranks(tensors)
        return terms
    flag = torch.stack([torch.isfinite(v.detach()).all() for v in terms.values()]).all().logical_not().float()
    flag = flag.reshape(1)
    average_across_ranks([*tensors, flag])
    return {**terms, "any_rank": flag.masked_fill(flag > 0, float("nan")).squeeze(0)}


def share_gradients(params: Sequence[Parameter], terms: dict[str, Tensor]) -> tuple[List[Tensor], dict[str, Tensor]]:
    """The gradients that `params` hold, averaged across ranks (in place), and the terms to check
    (see `average_with_terms`). Under torch.distributed with several ranks a parameter without a
    gradient counts as zero on this rank, and keeps none when no rank has one, as in one process."""
    if world_size() == 1 or not params:
        return [p.grad for p in params if p.grad is not None], terms
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32).to(params[0].device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    checks = average_with_terms([*(p.grad for p in params), used], terms)
    for p, share in zip(params, used.tolist()):
        if share == 0:
            p.grad = None
    return [p.grad for p in params if p.grad is not None], checks


def non_finite_names(terms: dict[str, Tensor], grads: Sequence[Tensor] = (), grad_name: str = "gradient") -> List[str]:
    """Names of the loss `terms` that are not finite, then `grad_name` if any of `grads` is not
    (one host read for all of them)."""
    checks = [torch.isfinite(v.detach()).all() for v in terms.values()]
    if grads:
        checks.append(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]).isfinite().all())
    ok = torch.stack(checks).tolist() if checks else []
    return [name for name, good in zip([*terms, grad_name], ok) if not good]


def split_parts(batch: dict) -> List[dict]:
    """The batch's parts in order (see `scripts.data.collate_rows`): part 0, the main step's rows,
    then one batch per surrogate step. A batch without `part` is all main."""
    if "part" not in batch:
        return [batch]
    part = batch["part"].cpu()
    parts = []
    for p in range(int(part.max()) + 1 if part.numel() else 1):
        rows = torch.nonzero(part == p).flatten().tolist()
        parts.append({k: (take_rows(v, rows) if isinstance(v, Tensor) else [v[r] for r in rows])
                      for k, v in batch.items()})
    return parts


def main_part(batch: dict) -> dict:
    """The main step's rows of a batch (part 0)."""
    return split_parts(batch)[0]


def take_rows(x: Tensor, rows: Sequence[int]) -> Tensor:
    """Rows `rows` of `x` (dim 0): a view when they are consecutive, else an index_select."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]:rows[0] + len(rows)]
    index = torch.tensor(rows, dtype=torch.long).to(x.device, non_blocking=True)
    return x.index_select(0, index)


@dataclass
class BatchLayout:
    """Which rows of a batch feed which loss (host-side lists of row indices)."""

    task_rows: List[List[int]]     # per task: rows labelled for it
    cls_rows: List[int]            # rows with at least one label
    seg_rows: List[int]            # rows whose mask may be used
    task_pos: List[List[int]] = field(default_factory=list)  # per task: positions of its rows in cls_rows

    @classmethod
    def of(cls, batch: dict) -> "BatchLayout":
        label = batch["label"].cpu()
        has_seg = batch["has_seg"].cpu().bool() if "has_seg" in batch else torch.zeros(label.shape[0], dtype=torch.bool)
        task_rows = [torch.nonzero(label[:, t] >= 0).flatten().tolist() for t in range(label.shape[1])]
        cls_rows = torch.nonzero((label >= 0).any(1)).flatten().tolist()
        where = {r: i for i, r in enumerate(cls_rows)}
        return cls(task_rows, cls_rows, torch.nonzero(has_seg).flatten().tolist(),
                   [[where[r] for r in rows] for rows in task_rows])


@dataclass
class TaskForward:
    """One forward pass of the network over a batch, with the plain multi-task losses."""

    features: List[Tensor]          # encoder outputs, all rows
    cls_feature: Tensor | None      # F_t of the cls rows
    cls_logits: List[Tensor]        # per task, over the cls rows
    task_losses: List[Tensor]       # per task cross-entropy over its rows (zero without rows)
    embedding: Tensor | None        # M_t of the decoder rows (seg rows first, then any extra rows)
    seg_loss: Tensor                # summed Dice of the segmentation heads over the seg rows (zero without)


class MTLStrategy(nn.Module, abc.ABC):
    """Base of every multi-task method.

    Args:
        network: the multi-task network (registered as `network`).
        optimizer: builds an optimizer from parameters, e.g. `partial(Lion, lr=1e-4, weight_decay=2e-5)`;
            kept as `make_optimizer` for the subclasses, which fill `optimizers` (main optimizer first).
        amp: bf16 autocast for the forward passes on CUDA (ignored on CPU).
    """

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False) -> None:
        super().__init__()
        self.network = network
        self.make_optimizer = optimizer
        self.amp = amp
        self.optimizers: List[Optimizer] = []
        self.skipped: List[str] = []   # what made updates of the last step be skipped (empty: none)
        self.surrogate_batches = 0     # extra batches per step that the loader must add (see IGReg)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast when `amp` is set and the network is on CUDA, else a no-op context."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def initialization_due(self, iterations_done: int) -> bool:
        """Whether the trainer should call `initialize` before the next iteration; never here."""
        return False

    def initialize(self, seg_batches: Iterable[dict]) -> None:
        """One-time set-up from batches of segmentation cases (see `initialization_due`); nothing here."""

    @abc.abstractmethod
    def step(self, batch: dict) -> dict[str, Tensor]:
        """One full update from a training batch; returns detached scalar tensors ("loss", one per term)."""

    def forward_tasks(self, batch: dict, layout: BatchLayout, extra_decoder_rows: Sequence[int] = ()) -> TaskForward:
        """Run the network where each loss needs it: the encoder and neck on all rows, the
        classification branch on the cls rows, the decoder on the seg rows (plus `extra_decoder_rows`,
        embedding only) and the segmentation heads on the seg rows."""
        net, image = self.network, batch["image"]
        if batch["label"].shape[1] != len(net.tasks):
            raise ValueError(f"batch has {batch['label'].shape[1]} label columns, the network {len(net.tasks)} tasks")
        zero = image.new_zeros((), dtype=torch.float32)
        decoder_rows = layout.seg_rows + list(extra_decoder_rows)
        n_seg = len(layout.seg_rows)
        cls_feature, cls_logits, embedding, seg_logits = None, [], None, []
        with self.autocast():
            feats = net.encoder(image)
            scales, fused = net.neck(feats)
            if layout.cls_rows:
                cls_feature, cls_logits = net.classifier([take_rows(s, layout.cls_rows) for s in scales])
            if decoder_rows:
                dec_scales = [take_rows(s, decoder_rows) for s in scales]
                embedding = net.decoder.embed(dec_scales)
                if n_seg:
                    seg_logits = net.decoder.segment(embedding[:n_seg], [s[:n_seg] for s in dec_scales],
                                                     take_rows(fused, layout.seg_rows), list(image.shape[2:]),
                                                     deep_supervision=True)
        label = batch["label"]
        task_losses = []
        for t, rows in enumerate(layout.task_rows):
            if not rows:
                task_losses.append(zero)
                continue
            logits = take_rows(cls_logits[t], layout.task_pos[t]).float()
            task_losses.append(F.cross_entropy(logits, take_rows(label[:, t], rows)))
        seg_loss = segmentation_loss(seg_logits, take_rows(batch["seg"], layout.seg_rows)) if n_seg else zero
        return TaskForward(feats, cls_feature, cls_logits, task_losses, embedding, seg_loss)

    def _update(self, optimizer: Optimizer, loss: Tensor, terms: dict[str, Tensor] | None = None) -> bool:
        """Backward of `loss`, then `_apply_gradients` (`terms`: the loss's named parts, for the check)."""
        optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            return False
        loss.backward()
        return self._apply_gradients(optimizer, {"loss": loss} if terms is None else terms)

    def _apply_gradients(self, optimizer: Optimizer, terms: dict[str, Tensor]) -> bool:
        """Step `optimizer` on the gradients its parameters hold, averaged across ranks first, unless
        a term of `terms` or a gradient is not finite: then the gradients are dropped, the names are
        added to `skipped` and False is returned."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads, checks = share_gradients(params, terms)
        bad = non_finite_names(checks, grads)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += bad
            return False
        optimizer.step()
        return True

    def _task_logs(self, out: TaskForward) -> dict[str, Tensor]:
        return {f"cls_{name}": loss.detach() for name, loss in zip(self.network.tasks, out.task_losses)}


class EqualWeighting(MTLStrategy):
    """Plain multi-task learning: sum of the task cross-entropies plus the segmentation Dice, one
    forward, one backward and one optimizer step."""

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False) -> None:
        super().__init__(network, optimizer, amp)
        self.optimizers = [self.make_optimizer(self.network.parameters())]

    def step(self, batch: dict) -> dict[str, Tensor]:
        self.skipped = []
        out = self.forward_tasks(batch, BatchLayout.of(batch))
        cls = torch.stack(out.task_losses).sum()
        loss = cls + out.seg_loss
        self._update(self.optimizers[0], loss, {"cls": cls, "seg": out.seg_loss})
        return {"loss": loss.detach(), "cls": cls.detach(), "seg": out.seg_loss.detach(), **self._task_logs(out)}


class IGReg(MTLStrategy):
    """IGReg: the multi-task network trained with DPA and STDGP under uncertainty weighting.

    One `step` is one outer iteration: copy the main classification path (not the heads) into the task surrogates,
    `surrogate_steps` projected surrogate updates, then the main update on the uncertainty-weighted
    sum of cls, seg, margin, heterogeneity, align and feature_reg.

    As in the reference, each surrogate step trains on its own batch (the batch's parts 1, 2, ...,
    which the loader adds when asked through `surrogate_batches`), encoded by the main encoder
    without gradients; the feature regularizer then compares surrogates and main network on the main
    batch (part 0), which the surrogates have not seen. A step given fewer parts (a hand-made batch)
    lets the remaining surrogate steps reuse the main batch's encoder features. The main forward
    runs first: the main parameters do not change during the surrogate steps, so this is the same
    computation as running the surrogates first.

    Args:
        network, optimizer, amp: see `MTLStrategy`; the optimizer factory also builds one optimizer
            per surrogate (`optimizers` = [main, surrogate per task...]).
        use_dpa: prototype losses (margin, heterogeneity, align); off = the "no DPA" ablation.
        use_stdgp: surrogates and the feature regularizer; off = the "no STDGP" ablation.
        surrogate_steps: surrogate updates per outer iteration.
        nc_neg, nc_pos, proto_dim, temperature, margin: the prototype bank (see `PrototypeBank`).
        align_fraction: share of the full-resolution voxels of the pair that the alignment loss samples
            (the reference's 1/64; see `PrototypeBank.alignment_loss` for the feature grid).
        feature_distance: l2 | mse | cosine, for the feature regularizer.
        init_voxels: most voxels per super-class kept for the k-means initialisation.
        kmeans: the prototypes' k-means, "reference" or "spherical" (see `PrototypeBank.initialize`).
        prototype_warmup: outer iterations before the prototypes' k-means, as in the reference, where the
            prototypes stay constant (all equal) until its first epoch ends and k-means then runs on the
            network trained so far; 0 runs it on the untrained network before the first iteration.
    """

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False, use_dpa: bool = True,
                 use_stdgp: bool = True, surrogate_steps: int = 2, nc_neg: int = 6, nc_pos: int = 6,
                 proto_dim: int = 64, temperature: float = 0.01, margin: float = 0.5, align_fraction: float = 1 / 64,
                 feature_distance: str = "l2", init_voxels: int = 20000, prototype_warmup: int = 0,
                 kmeans: str = "reference") -> None:
        super().__init__(network, optimizer, amp)
        if feature_distance not in DISTANCES:
            raise ValueError(f"feature_distance must be one of {DISTANCES}, got {feature_distance!r}")
        self.use_dpa, self.use_stdgp = use_dpa, use_stdgp
        self.surrogate_steps = surrogate_steps
        self.align_fraction = align_fraction
        self.feature_distance = feature_distance
        self.init_voxels = init_voxels
        if prototype_warmup < 0:
            raise ValueError(f"prototype_warmup must be 0 or more iterations, got {prototype_warmup}")
        self.prototype_warmup = int(prototype_warmup)
        if kmeans not in KMEANS:
            raise ValueError(f"kmeans must be one of {sorted(KMEANS)}, got {kmeans!r}")
        self.kmeans = kmeans
        terms = ["cls", "seg"] + (["margin", "heterogeneity", "align"] if use_dpa else [])
        terms += ["feature_reg"] if use_stdgp else []
        self.weighting = UncertaintyWeighting(terms).to(self.device)
        main_params = list(network.parameters()) + list(self.weighting.parameters())
        if use_dpa:
            self.dpa = PrototypeBank(network.num_channels, proto_dim, nc_neg, nc_pos, temperature, margin)
            self.dpa.to(self.device)
            main_params += list(self.dpa.parameters())
        self.optimizers = [self.make_optimizer(main_params)]
        if use_stdgp:
            self.surrogates = nn.ModuleList([Surrogate(network) for _ in network.tasks])
            self.optimizers += [self.make_optimizer(s.parameters()) for s in self.surrogates]
            self.surrogate_batches = surrogate_steps

    # ---- DPA ------------------------------------------------------------------------------------
    def initialization_due(self, iterations_done: int) -> bool:
        """The prototypes' k-means is due once `prototype_warmup` iterations are done, until it has run."""
        return self.use_dpa and iterations_done >= self.prototype_warmup and not bool(self.dpa.initialized)

    @torch.no_grad()
    def initialize(self, seg_batches: Iterable[dict]) -> None:
        """k-means initialisation of the prototypes from the segmentation cases of `seg_batches`
        (skipped without DPA or when the prototypes were already initialised, e.g. on resume).
        Under torch.distributed rank 0 computes them, then broadcasts the whole state (the prototypes,
        and the BatchNorm statistics its forward passes moved) to the other ranks."""
        if not self.use_dpa or bool(self.dpa.initialized):
            return
        if rank() == 0:
            self._kmeans_prototypes(seg_batches)
        broadcast_module(self)

    @torch.no_grad()
    def _kmeans_prototypes(self, seg_batches: Iterable[dict]) -> None:
        pool, net, was_training = VoxelPool(self.init_voxels), self.network, self.network.training
        net.train()
        for batch in seg_batches:
            has_seg = batch.get("has_seg", torch.ones(batch["image"].shape[0], dtype=torch.bool))
            rows = torch.nonzero(has_seg.cpu()).flatten().tolist()
            if not rows:
                continue
            with self.autocast():
                scales, _ = net.neck(net.encoder(take_rows(batch["image"], rows)))
                z = self.dpa.project(net.decoder.embed(scales))
            pool.add(z, mask_to_grid(take_rows(batch["seg"], rows), z.shape[2:]))
        net.train(was_training)
        if not pool.tumor:
            raise ValueError("prototype initialisation received no segmentation case (has_seg all False)")
        self.dpa.initialize(pool.tumor[0], pool.background[0], self.kmeans)

    def dpa_losses(self, out: TaskForward, batch: dict, layout: BatchLayout) -> dict[str, Tensor]:
        """Alignment over all decoder rows (seg rows and the random classification row); margin and
        heterogeneity over the seg rows."""
        zero = batch["image"].new_zeros((), dtype=torch.float32)
        if out.embedding is None:
            return {"margin": zero, "heterogeneity": zero, "align": zero}
        with self.autocast():
            z = self.dpa.project(out.embedding)
        upsampling = batch["image"][0, 0].numel() / z[0, 0].numel()
        losses = {"align": self.dpa.alignment_loss(z, self.align_fraction, upsampling),
                  "margin": zero, "heterogeneity": zero}
        n = len(layout.seg_rows)
        if n:
            tumor = mask_to_grid(take_rows(batch["seg"], layout.seg_rows), z.shape[2:])
            losses["margin"], losses["heterogeneity"] = self.dpa.margin_heterogeneity(z[:n], tumor)
        return losses

    # ---- STDGP ----------------------------------------------------------------------------------
    def sync_surrogates(self) -> None:
        """Copy the main classification path, all but the task heads, into every surrogate."""
        for s in self.surrogates:
            s.load_from(self.network)

    @staticmethod
    def task_batches(features: List[Tensor], label: Tensor, task_rows: List[List[int]]) -> list:
        """`(task, detached encoder features of its rows, its labels)` for each task with rows
        (`task_rows` index the rows of `features` and `label`)."""
        return [(t, [take_rows(f, rows).detach() for f in features], take_rows(label[:, t], rows))
                for t, rows in enumerate(task_rows) if rows]

    @torch.no_grad()
    def encoded_task_batches(self, batch: dict, layout: BatchLayout) -> list:
        """`task_batches` of a surrogate step's own batch: its classification rows through the main
        encoder, without gradients (in training mode, as the main forward)."""
        if not layout.cls_rows:
            return []
        with self.autocast():
            features = self.network.encoder(take_rows(batch["image"], layout.cls_rows))
        return self.task_batches(features, take_rows(batch["label"], layout.cls_rows), layout.task_pos)

    def surrogate_update(self, task_batches: list) -> Tensor:
        """One projected step of every surrogate (surrogate k dominated by task k); returns the mean
        over surrogates of their summed task losses before the step.

        The per-task gradients are averaged across ranks before the projection; when a loss or a
        gradient is not finite no surrogate is updated ("surrogate" goes to `skipped`).
        """
        pairs = list(zip(self.surrogates, self.optimizers[1:]))
        per_surrogate = [task_gradients(s, task_batches, self.autocast) for s, _ in pairs]
        grads = [g for g, _, _ in per_surrogate]
        tasks, loss = per_surrogate[0][1], torch.stack([lo for _, _, lo in per_surrogate]).mean()
        if non_finite_names(average_with_terms(grads, {"surrogate": loss}), grads, "surrogate"):
            self.skipped.append("surrogate")
            return loss
        for k, ((s, opt), g) in enumerate(zip(pairs, grads)):
            projected_update(s, opt, g, tasks, k)
        return loss

    def feature_regularizer(self, out: TaskForward, task_batches: list, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Gated pull of the main `F_t` toward surrogate k's feature on task k's rows; the gate
        compares surrogate k's true-class probability with the main step's own for the same row."""
        main_f, sur_f, main_p, sur_p = [], [], [], []
        for t, feats, labels in task_batches:
            with torch.no_grad(), self.autocast():
                feature, logits = self.surrogates[t].task_logits(feats, t)
            pos = layout.task_pos[t]
            main_logits = take_rows(out.cls_logits[t], pos).detach().float()
            main_f.append(take_rows(out.cls_feature, pos))
            sur_f.append(feature.float())
            main_p.append(main_logits.softmax(1).gather(1, labels[:, None]).squeeze(1))
            sur_p.append(logits.float().softmax(1).gather(1, labels[:, None]).squeeze(1))
        return gated_feature_regularizer(torch.cat(main_f), torch.cat(sur_f), torch.cat(main_p), torch.cat(sur_p),
                                         self.feature_distance)

    # ---- the outer iteration --------------------------------------------------------------------
    def step(self, batch: dict) -> dict[str, Tensor]:
        self.skipped = []
        batch, *surrogate_parts = split_parts(batch)
        layout = BatchLayout.of(batch)
        surrogate_layouts = [BatchLayout.of(part) for part in surrogate_parts]
        extra = [layout.cls_rows[random.randrange(len(layout.cls_rows))]] if self.use_dpa and layout.cls_rows else []
        out = self.forward_tasks(batch, layout, extra)
        losses = {"cls": torch.stack(out.task_losses).sum(), "seg": out.seg_loss}
        present: dict[str, Tensor | bool] = {"cls": any(layout.task_rows), "seg": bool(layout.seg_rows)}
        logs: dict[str, Tensor] = {}
        if self.use_dpa:
            losses.update(self.dpa_losses(out, batch, layout))
            present.update(margin=bool(layout.seg_rows), heterogeneity=bool(layout.seg_rows),
                           align=out.embedding is not None)
        if self.use_stdgp:
            batches = self.task_batches(out.features, batch["label"], layout.task_rows)
            self.sync_surrogates()
            if batches:
                for i in range(self.surrogate_steps):
                    own = (self.encoded_task_batches(surrogate_parts[i], surrogate_layouts[i])
                           if i < len(surrogate_parts) else batches)
                    if own:
                        logs["surrogate"] = self.surrogate_update(own)
                losses["feature_reg"], gate = self.feature_regularizer(out, batches, layout)
                present["feature_reg"] = gate.any()
                logs["gated"] = gate.float().mean()
            else:
                losses["feature_reg"], present["feature_reg"] = torch.zeros_like(out.seg_loss), False
        total = self.weighting(losses, present)
        self._update(self.optimizers[0], total, losses)
        logs.update({name: loss.detach() for name, loss in losses.items()})
        return {"loss": total.detach(), **logs, **self._task_logs(out)}


def _igreg(**switches: bool) -> Callable[..., MTLStrategy]:
    def build(network: IGRegNet, optimizer: OptimizerFactory, amp: bool, igreg: dict) -> MTLStrategy:
        return IGReg(network, optimizer, amp, **{**igreg, **switches})
    return build


# name -> builder(network, optimizer, amp, igreg options); other strategies register here
STRATEGIES: dict[str, Callable[..., MTLStrategy]] = {
    "igreg": _igreg(),
    "igreg_no_dpa": _igreg(use_dpa=False),
    "igreg_no_stdgp": _igreg(use_stdgp=False),
    "equal": lambda network, optimizer, amp, igreg: EqualWeighting(network, optimizer, amp),
    "uncertainty": lambda network, optimizer, amp, igreg: _baseline("UncertaintyOnly")(network, optimizer, amp),
    "pcgrad": lambda network, optimizer, amp, igreg: _baseline("PCGrad")(network, optimizer, amp),
    "cagrad": lambda network, optimizer, amp, igreg: _baseline("CAGrad")(network, optimizer, amp),
}


def _baseline(name: str) -> Callable[..., MTLStrategy]:
    """A strategy class of `scripts.gradient_strategies` (imported on use: that module imports this one)."""
    from scripts import gradient_strategies
    return getattr(gradient_strategies, name)


def build_strategy(name: str, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False,
                   igreg: dict | None = None, channels_last: bool = False) -> MTLStrategy:
    """The strategy called `name` (a key of `STRATEGIES`); `igreg` holds the IGReg options.
    `channels_last` stores every 3D convolution weight of the strategy (network, surrogates,
    prototype projection) channels-last, which the convolutions then also use for their outputs:
    the same model, faster on CPU (oneDNN) and with AMP on GPU."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name](network, optimizer, amp, dict(igreg or {}))
    if channels_last:
        strategy.to(memory_format=torch.channels_last_3d)  # in place: the optimizers keep their parameters
    return strategy
