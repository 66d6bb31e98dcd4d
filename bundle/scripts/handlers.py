"""Ignite handlers of the bundle: checkpoints, resume, metric files and plots.

Each is attached to an engine with `attach(engine)` (MONAI's handler convention) and writes on
rank 0 only, so that a torchrun job leaves one copy of every file.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.calibration import Calibration
from scripts.checkpoint import (
    CheckpointError,
    atomic_save,
    describe_mismatch,
    plain,
    remove_temporaries,
    safe_load,
    settings_digest,
    settings_mismatch,
)
from scripts.data.datalist import datalist_changes
from scripts.jsonio import strict_json
from scripts.plots import plot_confusion_matrices, plot_reliability_diagrams, plot_roc_curves
from scripts.savers import ModelFile

logger = logging.getLogger(__name__)


def _is_writer() -> bool:
    return idist.get_rank() == 0


def append_csv_row(path: Path, row: dict[str, Any], tag: Any) -> Path:
    """Append `row` to the CSV at `path` (header first when new); a file whose header differs (a
    resumed run with other columns) is left alone and `<stem>_<tag>.csv` is used instead. Returns
    the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with open(path) as f:
            if next(csv.reader(f), []) != list(row):
                new, path = True, path.with_name(f"{path.stem}_{tag}.csv")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path


class BestModelSaver:
    """After each validation that improves the key metric, save the network's state_dict (only) with
    the settings record: ignite's `Checkpoint` on an atomic `DiskSaver` (`scripts.savers.ModelFile`), rank 0.

    "Improves" is the evaluator's own decision (`best_metric_epoch` is this epoch), whose best score
    `TrainingState` restores on resume. Not MONAI's `CheckpointSaver(save_key_metric=True)`: it writes
    through a non-atomic `DiskSaver`, and its own record of the best score starts empty after a resume,
    so the first validation after one would replace model.pt whatever its score.
    """

    def __init__(self, network: torch.nn.Module, save_dir: str, filename: str = "model.pt",
                 settings: dict[str, Any] | None = None) -> None:
        self.file = ModelFile(network, save_dir, filename, settings)
        self.path = self.file.path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch:  # this validation did not improve it
            return
        self.file(engine)
        if _is_writer():
            logger.info(f"saved best model ({engine.state.best_metric:.4f}) to {self.path}")


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, g))


STATE_KEYS = ("iteration", "strategy", "optimizers", "lr_schedule", "loader", "rng", "best")


class TrainingState:
    """Saves the whole training state every `save_every` iterations and at each epoch's end, and
    restores it when training starts again with the same `ckpt_dir` (after a crash or a kill).

    Held: strategy (network, surrogates, log-variances, prototypes), every optimizer, the LR
    schedule, the iteration, RNG states, the sampler position, the evaluator's best metric and the
    trainer's counts of skipped updates.

    An epoch's last iteration is saved at EPOCH_COMPLETED only, after the validation (list this
    handler after the `ValidationHandler`), so a run killed during validation repeats it. Each save
    first moves the current file aside to `<name>.prev.pt`; at start the newest readable of the two
    is used (a damaged newest file is reported, then overwritten by the next save), and neither being
    readable is a `CheckpointError`.

    Ours, not ignite's `Checkpoint`/MONAI's `CheckpointSaver`: exact resume needs the RNG states, the
    sampler position and the skipped-update counts (no `state_dict` objects of their own), saves within
    an epoch deferred past the validation at its end, one fixed file rotated to `.prev.pt` with a
    fallback when the newest is damaged, and a load that checks the state and keeps this run's options.
    Its writes go through `atomic_save` (temporary file, fsync, rename, mode 0644).
    """

    def __init__(self, strategy: torch.nn.Module, lr_schedule: Any, ckpt_dir: str, save_every: int = 50,
                 loader: Any = None, evaluator: Engine | None = None, resume: bool = True,
                 filename: str = "training_state.pt", settings: Mapping[str, Any] | None = None,
                 datalist: Mapping[str, Mapping[str, str]] | None = None, accept_datalist_change: bool = False
                 ) -> None:
        self.strategy, self.lr_schedule, self.loader, self.evaluator = strategy, lr_schedule, loader, evaluator
        self.settings, self.datalist, self.accept_datalist_change = settings, datalist, accept_datalist_change
        self.path = Path(ckpt_dir) / filename
        self.previous = self.path.with_name(f"{self.path.stem}.prev{self.path.suffix}")
        self.save_every, self.resume = save_every, resume
        self.rotate = True  # False after resuming from the previous file: a damaged newest is not kept

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._within_epoch), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _within_epoch(self, engine: Engine, iteration: int) -> bool:
        """Every `save_every` iterations, except an epoch's last (saved after the validation)."""
        return iteration % self.save_every == 0 and iteration % engine.state.epoch_length != 0

    def state(self, engine: Engine) -> dict[str, Any]:
        ev = self.evaluator.state if self.evaluator is not None else None
        return {
            "iteration": engine.state.iteration,
            "strategy": self.strategy.state_dict(),
            "optimizers": [o.state_dict() for o in self.strategy.optimizers],
            "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule is not None else {},
            "loader": self.loader.state_dict() if hasattr(self.loader, "state_dict") else {},
            "rng": _rng_state(),
            "best": {"metric": float(ev.best_metric), "epoch": int(ev.best_metric_epoch)} if ev else {},
            "skipped": [engine.state.skipped_steps, engine.state.consecutive_skipped],
            **({"datalist": plain(self.datalist)} if self.datalist is not None else {}),
            **({"settings": plain(self.settings)} if self.settings is not None else {}),
        }

    def save(self, engine: Engine) -> None:
        if _is_writer():
            state = self.state(engine)
            if self.settings is not None:
                state["settings_sha256"] = settings_digest(state["settings"], _tensors(state["strategy"]))
            if self.rotate and self.path.exists():
                os.replace(self.path, self.previous)
            atomic_save(state, self.path)
            self.rotate = True

    def read(self) -> tuple[Path, dict[str, Any]] | None:
        """(path, state) of the newest usable training state, None when there is none."""
        problems = []
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            try:
                state = safe_load(path)
                if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
                    raise CheckpointError(f"{str(path)!r} is not a training state (keys {STATE_KEYS} expected)")
            except CheckpointError as e:
                logger.warning(f"training state {path} cannot be used: {e}")
                problems.append(str(e))
                continue
            if problems:
                logger.warning(f"resuming from the previous training state {path}")
            return path, state
        if problems:
            raise CheckpointError("no usable training state: " + "; ".join(problems)
                                  + " (remove these files or set resume to false to start over)")
        return None

    def load(self, engine: Engine) -> None:
        if _is_writer():
            remove_temporaries(self.path)
        if not self.resume:
            return
        found = self.read()
        if found is None:
            return
        path, state = found
        self.rotate = path == self.path
        diff = describe_mismatch(self.strategy.state_dict(), state["strategy"])
        if diff:
            raise CheckpointError(f"training state {str(path)!r} was saved with another configuration (set resume to "
                                  "false or use another ckpt_dir to start over):\n  " + "\n  ".join(diff))
        keep_position = self._check_record(path, state)
        self.strategy.load_state_dict(state["strategy"])
        configured = [[{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in o.param_groups]
                      for o in self.strategy.optimizers]
        for opt, st in zip(self.strategy.optimizers, state["optimizers"]):
            opt.load_state_dict(st)
        self._reapply(configured)
        if self.lr_schedule is not None:
            changes = self.lr_schedule.changes(state["lr_schedule"]) if hasattr(self.lr_schedule, "changes") else []
            if changes:  # the schedule of this run's options, continued at the saved step
                self.lr_schedule.restart_at(state["iteration"])
                logger.warning(f"resuming with another schedule ({'; '.join(changes)}): the cosine schedule is "
                               f"rebuilt for this run's options and continues at iteration {state['iteration']} "
                               f"(learning rate now {self.lr_schedule._last_lr[0]:.3g})")
            else:
                self.lr_schedule.load_state_dict(state["lr_schedule"])
        if state["loader"] and keep_position:
            self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        if self.evaluator is not None and state["best"] and keep_position:
            self.evaluator.state.best_metric = state["best"]["metric"]
            self.evaluator.state.best_metric_epoch = state["best"]["epoch"]
        engine.state.skipped_steps, engine.state.consecutive_skipped = state.get("skipped", (0, 0))
        engine.state.iteration = state["iteration"]
        engine.state.epoch = state["iteration"] // engine.state.epoch_length
        logger.info(f"resumed from {path} at iteration {engine.state.iteration}")
        total = engine.state.max_epochs * engine.state.epoch_length
        if engine.state.iteration >= total:
            logger.warning(f"this training is already finished: {path} is at iteration {engine.state.iteration} of "
                           f"{total} ({engine.state.max_epochs} epochs); nothing to do. Raise --epochs to train "
                           "longer, or use --resume false or another --ckpt_dir to start over.")

    def _check_record(self, path: Path, state: Mapping[str, Any]) -> bool:
        """Refuse a training state whose settings record was edited or differs from this run's settings, or
        whose datalist differs from this run's (unless `accept_datalist_change`: then False, the sampler
        position and the best score are not restored). True: restore everything."""
        saved = state.get("settings")
        if self.settings is not None and saved is not None:
            digest = state.get("settings_sha256")
            if digest is not None and digest != settings_digest(saved, _tensors(state["strategy"])):
                raise CheckpointError(f"training state {str(path)!r}: its settings record does not match its weights "
                                      "(edited after it was written?); set resume to false to start over")
            diff = settings_mismatch(saved, plain(self.settings))
            if diff:
                raise CheckpointError(f"training state {str(path)!r} was saved with other settings (set resume to "
                                      "false or use another ckpt_dir to start over):\n  " + "\n  ".join(diff))
        if self.datalist is None:
            return True
        if state.get("datalist") is None:
            logger.warning(f"training state {path} records no datalist (written before bundle 0.6.0): a change of "
                           "the training or validation list cannot be detected")
            return True
        changes = datalist_changes(state["datalist"], self.datalist)
        if not changes:
            return True
        what = "; ".join(changes)
        if not self.accept_datalist_change:
            raise CheckpointError(f"training state {str(path)!r} was saved with another datalist ({what}): its "
                                  "sampler position and best score refer to those lists; set --accept_datalist_change "
                                  "true to go on with this one, or --resume false to start over")
        logger.warning(f"resuming with another datalist ({what}): accepted; the sampler starts a new order and the "
                       "best score starts over, the weights and optimizer states are kept")
        return False

    def _reapply(self, configured: list[list[dict[str, Any]]]) -> None:
        """Put this run's optimizer options (e.g. weight_decay) back over the saved ones, saying which changed."""
        changed = set()
        for opt, groups in zip(self.strategy.optimizers, configured):
            for group, options in zip(opt.param_groups, groups):
                for key, value in options.items():
                    if key in group and group[key] != value:
                        changed.add(f"{key} {group[key]} -> {value}")
                    group[key] = value
        if changed:
            logger.warning(f"resuming with other optimizer options, this run's are used: {', '.join(sorted(changed))}")


class LastModelSaver:
    """Without validation cases, `BestModelSaver` never runs: then save the last model as
    `model.pt` after every epoch (said in the log once); and a run that ends without a model.pt
    saves its last model, so that a training never ends without one. Written as `BestModelSaver`
    writes (`scripts.savers.ModelFile`)."""

    def __init__(self, network: torch.nn.Module, save_dir: str, evaluator: Engine | None = None,
                 validation_cases: int | None = None, filename: str = "model.pt",
                 settings: dict[str, Any] | None = None) -> None:
        self.file = ModelFile(network, save_dir, filename, settings)
        self.path = self.file.path
        self.evaluator, self.validation_cases = evaluator, validation_cases
        self.said = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.check)

    def _validated(self) -> bool:
        if self.validation_cases is not None:
            return self.validation_cases > 0
        loader = getattr(self.evaluator, "data_loader", None)
        return loader is not None and len(loader) > 0

    def __call__(self, engine: Engine) -> None:
        if self._validated() or not _is_writer():
            return
        if not self.said:
            logger.warning(f"no validation cases: {self.path} is the last model (saved after every epoch), "
                           "not the best one")
            self.said = True
        self.file(engine)

    def check(self, engine: Engine) -> None:
        """At the end: a training that wrote no model.pt (no validation ran, e.g. `val_interval` above
        `epochs`, or none gave a finite score) saves its last model, saying so."""
        if _is_writer() and not self.path.exists():
            logger.warning(f"no validation chose a best model: {self.path} is the last model")
            self.file(engine)


class MetricsCSV:
    """Appends one row of scalar validation metrics per validation run (epoch = trainer's epoch)."""

    def __init__(self, output_dir: str, filename: str = "validation_metrics.csv") -> None:
        self.path = Path(output_dir) / filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _is_writer():
            return
        scalars = {k: v for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        row = {"epoch": engine.state.epoch, **scalars}
        self.path = append_csv_row(self.path, row, engine.state.epoch)


class EvaluationReport:
    """At the end of an evaluation: `metrics.json` (full report, calibration included) and PNG plots
    (ROC, confusion, reliability); `calibration` (default: ECE only) may also fit temperatures."""

    def __init__(self, output_dir: str, tasks: Sequence[str], calibration: Calibration | None = None) -> None:
        self.output_dir, self.tasks = Path(output_dir), list(tasks)
        self.calibration = calibration if calibration is not None else Calibration()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _is_writer():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        details = engine.state.metric_details
        report = details["report"]
        tables = self.calibration.update_report(report, details["probs"], details["labels"], self.tasks)
        (self.output_dir / "metrics.json").write_text(strict_json(report) + "\n")
        plot_roc_curves(details["probs"], details["labels"], self.tasks, self.output_dir / "roc_curves.png")
        plot_confusion_matrices(report["tasks"], self.output_dir / "confusion_matrices.png")
        plot_reliability_diagrams(tables, self.output_dir / "reliability_diagram.png")
        logger.info(f"evaluation report written to {self.output_dir}")
        logger.info(score_summary(report))


def score_summary(report: dict) -> str:
    """One line of an evaluation report: mean and per-task macro-F1 and ROC AUC, and Dice."""
    tasks = report["tasks"]
    f1 = ", ".join(f"{t} {r['macro_f1']:.3f}" for t, r in tasks.items())
    auc = ", ".join(f"{t} {r['roc_auc']:.3f}" for t, r in tasks.items())
    return (f"mean macro-F1 {report['mean_macro_f1']:.3f} ({f1}); ROC AUC {auc}; "
            f"Dice {report['dice']:.3f} over {report['dice_cases']} cases")
