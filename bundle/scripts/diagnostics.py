"""Gradient-conflict diagnostics: how the tasks' gradients on the shared trunk (encoder and neck)
agree, measured on a training batch without changing the training, and which task's descent
direction the applied update follows (sign agreement: Lion moves every coordinate by a sign).

The measurement runs the network in training mode (as the step does) and takes one gradient per
task, and one per term of the strategy's objective as it enters the update (`objective_terms`: for
IGReg each task, seg, margin, heterogeneity, alignment and feature regularizer under their uncertainty
weights), with `torch.autograd.grad`: parameter `.grad`s and optimizer states are not touched, and the
BatchNorm running statistics the extra forwards move and the random number generators are put back.
"""

from __future__ import annotations

import itertools
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from scripts.distributed import average_across_ranks
from scripts.engine import prepare_batch
from scripts.handlers import append_csv_row
from scripts.mtl.base import BatchLayout, MTLStrategy, main_part
from scripts.mtl.gradients import all_task_losses, flatten, shared_parameters, task_gradients


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


def sign_agreement(grads: Tensor, update: Tensor, names: List[str]) -> dict[str, float]:
    """Per task, ``sign_agree_<task>``: the share of coordinates where the sign of the applied
    ``update`` [P] equals the sign of the task's descent direction (minus its gradient, ``grads``
    [T, P]), over the coordinates where both are non-zero (NaN when there are none)."""
    update = update.detach().double()
    out = {}
    for name, g in zip(names, grads.detach().double()):
        both = (update != 0) & (g != 0)
        agree = (torch.sign(update[both]) == -torch.sign(g[both])).double()
        out[f"sign_agree_{name}"] = float(agree.mean()) if agree.numel() else float("nan")
    return out


def trunk_vector(strategy: MTLStrategy) -> Tensor:
    """The shared trunk's parameters as one flat float32 copy."""
    shared = shared_parameters(strategy.network)
    return flatten([p.detach() for p in shared], shared).clone()


@contextmanager
def left_as_it_was(strategy: MTLStrategy) -> Iterator[None]:
    """Runs the block with the network in training mode (as the step), then puts back its mode and
    buffers (the BatchNorm statistics an extra forward moves) and the random number generators."""
    net = strategy.network
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    was_training = net.training
    python_state = random.getstate()
    net.train()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        net.train(was_training)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])


def measure_task_gradients(strategy: MTLStrategy, batch: dict) -> Tensor:
    """The task gradients [T, P] (classification tasks, then "seg") on the shared trunk for one
    training batch; the strategy's state is left as it was. Under torch.distributed every rank calls
    it with its own batch, and the gradients are averaged over the ranks (those of the global batch)."""
    with left_as_it_was(strategy):
        out = strategy.forward_tasks(batch, BatchLayout.of(batch))
        shared = shared_parameters(strategy.network)
        grads = torch.stack([flatten(g, shared) for g in task_gradients(all_task_losses(out), shared)])
    average_across_ranks([grads])
    return grads


def measure_term_gradients(strategy: MTLStrategy, batch: dict) -> tuple[List[str], Tensor]:
    """The names of the terms of the strategy's main objective (`MTLStrategy.objective_terms`: each task,
    seg and the strategy's own terms, weighted as in the update) and their gradients [K, P] on the shared
    trunk for one training batch, averaged over the ranks; the strategy's state is left as it was."""
    with left_as_it_was(strategy):
        terms = strategy.objective_terms(batch)
        shared = shared_parameters(strategy.network)
        grads = torch.stack([flatten(g, shared) for g in task_gradients(list(terms.values()), shared)])
    average_across_ranks([grads])
    return list(terms), grads


def term_row(names: List[str], grads: Tensor, update: Tensor) -> dict[str, float]:
    """Per objective term: ``term_norm_<name>``, its gradient's norm on the trunk, and ``term_sign_<name>``,
    the share of trunk coordinates where the applied update has the sign of its descent."""
    agree = sign_agreement(grads, update, names)
    row = {f"term_norm_{n}": float(g.double().norm()) for n, g in zip(names, grads)}
    row.update({f"term_sign_{n}": agree[f"sign_agree_{n}"] for n in names})
    return row


def log_variances(strategy: MTLStrategy) -> dict[str, float]:
    """``log_var_<term>`` of a strategy with uncertainty weights (none otherwise)."""
    weighting = getattr(strategy, "weighting", None)
    if weighting is None:
        return {}
    return {f"log_var_{n}": float(v) for n, v in zip(weighting.names, weighting.log_vars.detach().cpu())}


def measure_conflicts(strategy: MTLStrategy, batch: dict) -> GradientConflicts:
    """Gradient conflicts of the strategy's tasks on the shared trunk for one training batch (see
    :func:`measure_task_gradients`)."""
    return conflict_stats(measure_task_gradients(strategy, batch), [*strategy.network.tasks, "seg"])


class GradientConflictLogger:
    """Every `every` training iterations (0: never), measure the task gradients on the main batch of
    that iteration (part 0, without IGReg's surrogate batches) with the weights the step starts from
    (at ITERATION_STARTED: the batch is fetched, the step not yet taken), and once the step is done
    (ITERATION_COMPLETED) write their conflicts and each task's sign agreement with the applied
    update of the trunk to TensorBoard (`output_dir`, tags `gradients/...`) and to
    `output_dir/gradient_conflicts.csv` (one row per measurement). Every rank measures (the
    gradients are averaged over the ranks), rank 0 writes."""

    def __init__(self, strategy: MTLStrategy, every: int, output_dir: str,
                 filename: str = "gradient_conflicts.csv") -> None:
        self.strategy, self.every = strategy, int(every)
        self.output_dir, self.path = Path(output_dir), Path(output_dir) / filename
        self.writer: SummaryWriter | None = None
        self.pending: tuple[Tensor, Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        if self.every > 0:
            engine.add_event_handler(Events.ITERATION_STARTED(every=self.every), self.before_step)
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)
            engine.add_event_handler(Events.COMPLETED, self.close)

    def before_step(self, engine: Engine) -> None:
        """Task and objective-term gradients and a copy of the trunk, on the step's batch and weights."""
        image, targets = prepare_batch(engine.state.batch, engine.state.device, engine.non_blocking)
        batch = main_part({"image": image, **targets})
        grads = measure_task_gradients(self.strategy, batch)
        self.pending = (grads, measure_term_gradients(self.strategy, batch), trunk_vector(self.strategy))

    def __call__(self, engine: Engine) -> None:
        if self.pending is None:
            return
        grads, (term_names, term_grads), before = self.pending
        self.pending = None
        names = [*self.strategy.network.tasks, "seg"]
        update = trunk_vector(self.strategy) - before
        row = {**conflict_stats(grads, names).row(), **sign_agreement(grads, update, names),
               **term_row(term_names, term_grads, update), **log_variances(self.strategy)}
        if idist.get_rank() != 0:
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
