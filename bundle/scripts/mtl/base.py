"""The interface of every multi-task strategy ("given a batch, make one update") and what the methods share:
`MTLStrategy`, the batch layout (`BatchLayout`, `TaskForward`, `split_parts`, `main_part`, `take_rows`) and the
update guard (`share_gradients`, `non_finite_names`, `average_with_terms`).

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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Sequence

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter
from torch.optim import Optimizer

from scripts.distributed import average_across_ranks
from scripts.networks import IGRegNet
from scripts.objective import segmentation_loss

OptimizerFactory = Callable[[Iterable[Parameter]], Optimizer]


def average_with_terms(tensors: Sequence[Tensor], terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """`average_across_ranks(tensors)`, and `terms` to check: under torch.distributed with several
    ranks they gain "any_rank", NaN when a term of some rank is not finite, so that
    `non_finite_names` answers the same on every rank (the averaged tensors already agree)."""
    if idist.get_world_size() == 1 or not terms:
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
    if idist.get_world_size() == 1 or not params:
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

    def objective_terms(self, batch: dict) -> dict[str, Tensor]:
        """The main update's objective on `batch` split into its terms as they enter the update (weights
        applied, additive constants left out), for the diagnostics: here each classification task's
        cross-entropy and the segmentation Dice, summed with weight 1. Strategies with other terms or
        weights override it; the network's state is not changed."""
        out = self.forward_tasks(batch, BatchLayout.of(batch))
        return {**dict(zip(self.network.tasks, out.task_losses)), "seg": out.seg_loss}

    def _task_logs(self, out: TaskForward) -> dict[str, Tensor]:
        return {f"cls_{name}": loss.detach() for name, loss in zip(self.network.tasks, out.task_losses)}
