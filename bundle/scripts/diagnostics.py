"""Gradient-conflict diagnostics: how the tasks' gradients on the shared trunk (encoder and neck)
agree, measured on a training batch without changing the training.

The measurement runs the network in training mode (as the step does) and takes one gradient per
task with `torch.autograd.grad`: parameter `.grad`s, optimizer states and random number generators
are not touched, and the BatchNorm running statistics that the extra forward moves are put back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch
from ignite.engine import Engine, Events
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from scripts.distributed import average_across_ranks, rank
from scripts.engine import prepare_batch
from scripts.gradient_strategies import all_task_losses, flatten, shared_parameters, task_gradients
from scripts.handlers import append_csv_row
from scripts.strategies import BatchLayout, MTLStrategy, main_part


@dataclass
class GradientConflicts:
    """Pairwise cosines [T, T] and norms [T] of the task gradients, and the share of conflicting pairs."""

    names: List[str]
    cosines: Tensor
    norms: Tensor
    conflict_fraction: float

    def row(self) -> dict[str, float]:
        """Flat scalars: conflict_fraction, norm_<task>, cos_<task>_<task> (each pair once)."""
        out = {"conflict_fraction": self.conflict_fraction}
        out.update({f"norm_{n}": float(v) for n, v in zip(self.names, self.norms)})
        for i, j in itertools.combinations(range(len(self.names)), 2):
            out[f"cos_{self.names[i]}_{self.names[j]}"] = float(self.cosines[i, j])
        return out


def conflict_stats(grads: Tensor, names: List[str]) -> GradientConflicts:
    """Cosines, norms and conflict fraction of task gradients [T, P]. A pair conflicts when its cosine
    is negative; pairs with a zero gradient have no cosine (NaN) and are left out of the fraction
    (NaN when no pair is left)."""
    grads = grads.detach().double()
    norms = grads.norm(dim=1)
    cos = (grads @ grads.T) / (norms[:, None] * norms[None, :])
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.full_like(cos, float("nan")))
    pairs = torch.triu_indices(len(names), len(names), offset=1)
    values = cos[pairs[0], pairs[1]]
    values = values[~values.isnan()]
    fraction = float((values < 0).double().mean()) if values.numel() else float("nan")
    return GradientConflicts(list(names), cos.float().cpu(), norms.float().cpu(), fraction)


def measure_conflicts(strategy: MTLStrategy, batch: dict) -> GradientConflicts:
    """Gradient conflicts of the strategy's tasks (classification tasks, then "seg") on the shared
    trunk for one training batch; the strategy's state is left as it was. Under torch.distributed
    every rank calls it with its own batch, and the task gradients are averaged over the ranks
    first, so that all ranks report the conflicts of the global batch."""
    net = strategy.network
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    was_training = net.training
    net.train()
    try:
        out = strategy.forward_tasks(batch, BatchLayout.of(batch))
        shared = shared_parameters(net)
        grads = torch.stack([flatten(g, shared) for g in task_gradients(all_task_losses(out), shared)])
    finally:
        net.train(was_training)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])
    average_across_ranks([grads])
    return conflict_stats(grads, [*net.tasks, "seg"])


class GradientConflictLogger:
    """Every `every` training iterations (0: never), measure the gradient conflicts on the main batch
    that iteration trained on (part 0, without IGReg's surrogate batches) and write them to
    TensorBoard (`output_dir`, tags `gradients/...`) and to `output_dir/gradient_conflicts.csv` (one
    row per measurement). Every rank measures (the gradients are averaged over the ranks), rank 0
    writes."""

    def __init__(self, strategy: MTLStrategy, every: int, output_dir: str,
                 filename: str = "gradient_conflicts.csv") -> None:
        self.strategy, self.every = strategy, int(every)
        self.output_dir, self.path = Path(output_dir), Path(output_dir) / filename
        self.writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        if self.every > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)
            engine.add_event_handler(Events.COMPLETED, self.close)

    def __call__(self, engine: Engine) -> None:
        image, targets = prepare_batch(engine.state.batch, engine.state.device, engine.non_blocking)
        row = measure_conflicts(self.strategy, main_part({"image": image, **targets})).row()
        if rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=str(self.output_dir))
        for name, value in row.items():
            self.writer.add_scalar(f"gradients/{name}", value, engine.state.iteration)
        self.writer.flush()
        self.path = append_csv_row(self.path, {"iteration": engine.state.iteration, **row}, engine.state.iteration)

    def close(self, engine: Engine | None = None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
