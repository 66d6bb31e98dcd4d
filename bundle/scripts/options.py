"""Command-line options: parsing of overrides the bundle runner passes through as text, the check of
every training option before the first iteration, and the lock of a training's ckpt_dir."""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def as_flag(value: Any, name: str) -> bool:
    """``value`` as a bool. ``--resume false`` reaches the config as the string "false" (only
    ``False`` is parsed by the runner), which Python would treat as true; this reads it as meant."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise OptionError(f"option --{name} must be true or false, got {value!r}")


class OptionError(ValueError):
    """A command-line option (config value) that cannot be used; the message names it and the allowed values."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise OptionError(f"option --{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = True) -> float:
    if not _is_number(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise OptionError(f"option --{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise OptionError(f"option --{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_writable(name: str, folder: Any) -> str:
    """Create `folder` if needed and prove that a file can be written in it."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise OptionError(f"option --{name} must be a folder path, got {folder!r}")
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".igreg_write_test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OptionError(f"option --{name}: cannot write in {path}: {err.strerror or err}") from None
    return str(path)


def check_training_options(config: Mapping[str, Any], rank: int = 0) -> None:
    """Refuse, before anything is trained, every training option that cannot work, naming it.

    `config` maps option names (as on the command line) to their values; the folders are created
    and probed for writing on rank 0 only (the only rank that writes)."""
    from scripts.data.datalist import SPLITS, TASKS
    from scripts.mtl import STRATEGIES
    from scripts.stdgp import DISTANCES

    c = dict(config)
    for name in ("epochs", "iters_per_epoch", "val_interval", "samples_per_class", "save_every", "max_bad_steps",
                 "log_every", "surrogate_steps"):
        if name in c:
            check_int(name, c[name], 1)
    for name in ("seg_samples", "diagnose_every", "num_workers", "seed"):
        if name in c:
            check_int(name, c[name], 0)
    check_number("learning_rate", c.get("learning_rate"), 0.0)
    if "min_lr" in c:
        check_number("min_lr", c["min_lr"], 0.0, strict=False)
        if c["min_lr"] > c["learning_rate"]:
            raise OptionError(f"option --min_lr ({c['min_lr']}) must not exceed --learning_rate ({c['learning_rate']})")
    if "weight_decay" in c:
        check_number("weight_decay", c["weight_decay"], 0.0, strict=False)
    if "cache" in c:
        check_choice("cache", c["cache"], ("none", "memory", "disk"))
    if "mtl_strategy" in c:
        check_choice("mtl_strategy", c["mtl_strategy"], sorted(STRATEGIES))
    if "feature_distance" in c:
        check_choice("feature_distance", c["feature_distance"], DISTANCES)
    if "val_split" in c:
        check_choice("val_split", c["val_split"], SPLITS)
    for name in ("amp", "resume", "channels_last", "accept_datalist_change"):
        if name in c:
            as_flag(c[name], name)
    tasks = c.get("tasks")
    if not isinstance(tasks, (list, tuple)) or not tasks or any(t not in TASKS for t in tasks) \
            or len(set(tasks)) != len(tasks):
        raise OptionError(f"option --tasks must be a non-empty list of distinct tasks from {list(TASKS)}, "
                          f"got {tasks!r}")
    pixdim = c.get("pixdim")
    if not isinstance(pixdim, (list, tuple)) or len(pixdim) != 3 or not all(_is_number(p) and p > 0 for p in pixdim):
        raise OptionError(f"option --pixdim must be three positive numbers (mm), got {pixdim!r}")
    size = c.get("spatial_size")
    if not isinstance(size, (list, tuple)) or len(size) != 3 or \
            not all(_is_int(s) and s >= 16 and s % 16 == 0 for s in size):
        raise OptionError(f"option --spatial_size must be three integers, each a multiple of 16, got {size!r}")
    ratios = c.get("task_ratios")
    if ratios is not None and (not isinstance(ratios, (list, tuple)) or len(ratios) != len(tasks)
                               or not all(_is_number(r) and r > 0 for r in ratios)):
        raise OptionError(f"option --task_ratios must be null or {len(tasks)} positive numbers (one per task), "
                          f"got {ratios!r}")
    for name in ("ckpt_dir", "output_dir"):
        if name in c and not rank:
            check_writable(name, c[name])


class TrainingLockError(RuntimeError):
    """Another live run (training, or inference) uses the same folder."""


LOCK_NAME = ".training.lock"
_held: set[str] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_training_lock(ckpt_dir: str | os.PathLike, rank: int = 0) -> str | None:
    """Hold `<ckpt_dir>/.training.lock` (pid and host) for this process until it exits (training
    locks its ckpt_dir and its output_dir). Ranks other than 0 do not lock (rank 0 holds it for the job)."""
    if rank:
        return None
    return acquire_lock(ckpt_dir, LOCK_NAME, "training", "--ckpt_dir / --output_dir")


def acquire_lock(folder: str | os.PathLike, name: str = LOCK_NAME, what: str = "training",
                 option: str = "--ckpt_dir / --output_dir") -> str:
    """Hold the lock file `<folder>/<name>` (pid and host) for this process until it exits or
    `release_lock`; `what` names the kind of run and `option` the folder's option in the messages.

    A lock of a live process on this host refuses the run (two runs would interleave their files);
    a lock whose process is gone (kill -9) is taken over with a warning. The process that holds it
    may take it again."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                pid, host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = -1, me["host"]  # unreadable: a writer killed mid-write
            if pid == me["pid"] and host == me["host"]:
                _held.add(str(path))
                return str(path)
            if host != me["host"]:
                raise TrainingLockError(f"{folder} is locked by a {what} on host {host} (pid {pid}); "
                                        f"if it is no longer running, delete {path}")
            if pid > 0 and _alive(pid):
                raise TrainingLockError(f"another {what} (pid {pid}) is using {folder} (its {name}); wait "
                                        f"for it, stop it, or choose another {option}")
            logger.warning(f"taking over the stale lock {path} of process {pid}, which is no longer running")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.add(str(path))
        if len(_held) == 1:
            atexit.register(release_training_locks)
        return str(path)
    raise TrainingLockError(f"could not lock {folder} ({path})")


def release_lock(path: str | os.PathLike) -> None:
    """Remove the lock file at `path` if this process holds it."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError, AttributeError):
        pass
    _held.discard(str(path))


def release_training_locks() -> None:
    """Remove the locks this process holds."""
    for name in list(_held):
        release_lock(name)
