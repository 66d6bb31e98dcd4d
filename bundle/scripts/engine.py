"""The IGReg trainer: a MONAI `Trainer` whose iteration hands the task-balanced batch to a strategy.

Everything else (validation, checkpoints, logs, learning-rate schedule, resume) is attached as
handlers, as in MONAI's own workflows. The trainer itself watches the strategy's guarded updates:
a step whose loss or gradient was not finite is counted, logged and undone (buffers included), and
too many of them in a row stop training.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import torch
from ignite.engine import Events
from monai.engines import Trainer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from scripts.data.loader import BATCH_KEYS
from scripts.mtl.base import MTLStrategy

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised after `max_bad_steps` consecutive iterations whose update was skipped as non-finite."""


def prepare_batch(batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False,
                  **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch dict -> (image, targets) on `device`; targets hold `label`, `seg`, `has_seg`.

    Shaped as MONAI's evaluators expect (`inputs, targets`); the trainer re-joins both.
    """
    moved = {k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking, **kwargs)
             for k in BATCH_KEYS if k in batchdata}
    return moved.pop("image"), moved


def _describe_cases(case_ids: Sequence[str] | None, image: torch.Tensor) -> str:
    """The cases of a skipped batch for the warning: those with non-finite voxels when there are
    any (the usual cause), else all of them."""
    if not case_ids:
        return ""
    bad = [c for c, row in zip(case_ids, image) if not bool(torch.isfinite(row).all())]
    return f"; non-finite voxels in case(s) {', '.join(bad)}" if bad else f"; batch cases {', '.join(case_ids)}"


def _fmt(values: Any) -> str:
    values = list(values or [])
    return f"{values[0]:g}" if values and len(set(values)) == 1 else str(values)


class CosineSchedule:
    """Cosine decay from each optimizer's learning rate down to `min_lr` over `total_steps`,
    applied to every optimizer of a strategy (main network and surrogates alike)."""

    def __init__(self, optimizers: Sequence[Optimizer], total_steps: int, min_lr: float = 0.0) -> None:
        self.total_steps, self.min_lr = max(1, total_steps), min_lr
        self.schedulers = [CosineAnnealingLR(o, T_max=self.total_steps, eta_min=min_lr) for o in optimizers]

    def changes(self, saved: dict[str, Any]) -> list[str]:
        """How the schedule of a saved training state (`state_dict()`) differs from this one's."""
        out = []
        for i, (s, st) in enumerate(zip(self.schedulers, saved.get("schedulers", []))):
            which = "" if i == 0 else f" (optimizer {i})"
            if st.get("T_max") != s.T_max:
                out.append(f"total steps (epochs x iters_per_epoch){which} {st.get('T_max')} -> {s.T_max}")
            if st.get("eta_min") != s.eta_min:
                out.append(f"min_lr{which} {st.get('eta_min')} -> {s.eta_min}")
            if list(st.get("base_lrs", [])) != list(s.base_lrs):
                out.append(f"learning_rate{which} {_fmt(st.get('base_lrs'))} -> {_fmt(s.base_lrs)}")
        return out

    def restart_at(self, step: int) -> None:
        """Continue this schedule (its total steps, base and minimum rates) at `step`: every
        optimizer's rate becomes the cosine's value there, and later steps follow this schedule."""
        for s in self.schedulers:
            s.last_epoch = step
            s._step_count = step + 1
            t = min(step, s.T_max)
            for group, base in zip(s.optimizer.param_groups, s.base_lrs):
                group["initial_lr"] = base
                group["lr"] = s.eta_min + (base - s.eta_min) * (1 + math.cos(math.pi * t / s.T_max)) / 2
            s._last_lr = [g["lr"] for g in s.optimizer.param_groups]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    @property
    def _last_lr(self) -> list[float]:  # read by monai.handlers.LrScheduleHandler(print_lr=True)
        return self.schedulers[0].get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, st in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(st)


class IGRegTrainer(Trainer):
    """Runs `strategy.step(batch)` once per iteration.

    Args:
        device: where the batch goes.
        max_epochs: epochs to run.
        train_data_loader: yields task-balanced training batches (`image`, `label`, `seg`, `has_seg`).
        strategy: the multi-task method; owns the network and every optimizer.
        epoch_length: iterations per epoch (the reference: 100).
        prototype_loader: batches of segmentation cases for the strategy's one-time initialisation (IGReg:
            the k-means of the DPA prototypes), run before the first iteration at which the strategy says
            it is due (`MTLStrategy.initialization_due`; a resumed run that already did it does not redo it).
        train_handlers: MONAI / Ignite handlers to attach.
        max_bad_steps: consecutive iterations with a skipped (non-finite) update that stop training
            with `NonFiniteTrainingError`.

    `state.skipped_steps` and `state.consecutive_skipped` count the iterations whose update the
    strategy skipped; each step's output has `skipped` (1.0 or 0.0) beside the loss terms.
    """

    def __init__(self, device: torch.device | str, max_epochs: int, train_data_loader: Iterable,
                 strategy: MTLStrategy, epoch_length: int | None = None, prototype_loader: Iterable | None = None,
                 train_handlers: Sequence | None = None, non_blocking: bool = False, max_bad_steps: int = 5,
                 **kwargs: Any) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be at least 1, got {max_bad_steps}")
        self.strategy = strategy
        self.network = strategy.network
        self.optimizer = strategy.optimizers[0]
        self.prototype_loader = prototype_loader
        self.max_bad_steps = max_bad_steps
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, non_blocking=non_blocking, prepare_batch=prepare_batch,
                         handlers=train_handlers, decollate=False, **kwargs)
        self.state.skipped_steps = self.state.consecutive_skipped = 0  # restored by TrainingState on resume
        self.add_event_handler(Events.ITERATION_STARTED, self._initialize_strategy)

    def _initialize_strategy(self, engine: "IGRegTrainer") -> None:
        """Before an iteration: the strategy's initialisation, once it is due (iterations done so far)."""
        if self.prototype_loader is not None and self.strategy.initialization_due(engine.state.iteration - 1):
            self.strategy.initialize(
                {"image": img, **tgt} for img, tgt in
                (prepare_batch(b, engine.state.device, self.non_blocking) for b in self.prototype_loader))

    def _iteration(self, engine: "IGRegTrainer", batchdata: dict) -> list[dict[str, torch.Tensor]]:
        """One strategy step; the loss terms come back as a one-item list, the shape of MONAI's
        decollated outputs, so `from_engine(['loss'], first=True)` (e.g. MLflow tracking) reads them."""
        image, targets = prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        self.strategy.train()
        buffers = [b.clone() for b in self.strategy.buffers()]  # e.g. BatchNorm statistics, moved by the forward
        logs = self.strategy.step({"image": image, **targets})
        if self.strategy.skipped:
            for buffer, before in zip(self.strategy.buffers(), buffers):
                buffer.copy_(before)
            self._count_skipped(engine, _describe_cases(batchdata.get("case_id"), image))
        else:
            engine.state.consecutive_skipped = 0
        return [{**logs, "skipped": torch.tensor(float(bool(self.strategy.skipped)))}]

    def _count_skipped(self, engine: "IGRegTrainer", cases: str = "") -> None:
        state, names = engine.state, ", ".join(dict.fromkeys(self.strategy.skipped))
        state.skipped_steps += 1
        state.consecutive_skipped += 1
        logger.warning(f"iteration {state.iteration}: update skipped, not finite: {names} "
                       f"({state.consecutive_skipped} in a row, {state.skipped_steps} in all){cases}")
        if state.consecutive_skipped >= self.max_bad_steps:
            raise NonFiniteTrainingError(
                f"training stopped at iteration {state.iteration}: {state.consecutive_skipped} consecutive updates "
                f"were skipped because the loss or gradients were not finite (last: {names}). The skipped updates "
                "did not change the weights, and the last saved training state is kept: check the data (NaN or "
                "infinite voxels) or lower the learning rate, then run the same command to resume.")
