"""Checkpoint files: atomic writes, weights-only reads and a readable refusal of foreign weights."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from torch import nn

_TMP_SUFFIX = ".tmp"
FILE_MODE = 0o644  # checkpoints: readable by the other users of a shared folder, not tempfile's 0600
SETTINGS_KEY = "igreg_settings"  # model.pt: torch.load(path, weights_only=True)._metadata[SETTINGS_KEY]
DIGEST_KEY = "igreg_settings_sha256"  # SHA-256 binding the settings record to the weights (`settings_digest`)
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, pickled objects or another model."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (e.g. a full disk); the message names the folder and the space."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` with torch.save so that `path` holds either the old or the new file, never half.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then renamed; the
    file is readable by all (mode 0644). The training state's writer (model.pt: `scripts.savers`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except OSError as err:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        needed = max(written, path.stat().st_size if path.exists() else 0)
        raise CheckpointWriteError(write_failure(path, err, needed)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_failure(path: Path, err: OSError, needed: int = 0) -> str:
    """One line for a file that could not be written: the file, its folder, why (a full disk says so), the
    space it needs (`needed` bytes: what was written before the failure, the file it replaces, or an estimate)
    and the space free."""
    def size(n: float) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

    try:
        free = f"{size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    why = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    need = f"about {size(needed)} needed, " if needed else ""
    return f"cannot write {path.name} in {path.parent}: {why} ({need}{free}); nothing was replaced"


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync `folder`, so that a rename in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(path: str | os.PathLike) -> None:
    """Delete the temporary files an `atomic_save` to `path` left when its process was killed."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(..., weights_only=True)`; a truncated file or one needing pickled objects raises CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)!r} as tensors and plain values: {e}") from e


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a network's state_dict and a checkpoint's."""
    lines = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        lines.append(f"missing from the checkpoint: {_summarise(missing)}")
    if extra:
        lines.append(f"not in this network: {_summarise(extra)}")
    for k in sorted(set(expected) & set(found)):
        if tuple(expected[k].shape) != tuple(found[k].shape):
            lines.append(f"{k}: checkpoint shape {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}")
    return lines


def _summarise(keys: list[str], most: int = 6) -> str:
    """Group parameter names by their first two components (e.g. `heads.grade`) and list a few."""
    groups = sorted({".".join(k.split(".")[:2]) for k in keys})
    more = f" (+{len(groups) - most} more)" if len(groups) > most else ""
    return ", ".join(groups[:most]) + more


def plain(value: Any) -> Any:
    """`value` as plain JSON-like data (dict of str, list, int, float, str, bool, None)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def settings_digest(settings: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a settings record together with the weights it describes (names, shapes, dtypes, bytes):
    a record edited after it was written (e.g. to claim another pooling) no longer matches it."""
    digest = hashlib.sha256(json.dumps(plain(settings), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def with_settings(state: dict[str, torch.Tensor], settings: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """`state` (a state_dict, still loadable by `load_state_dict` and `torch.load(weights_only=True)`)
    carrying `settings` as plain data in its `_metadata[SETTINGS_KEY]`, where PyTorch keeps the
    per-module versions of a state_dict, with `settings_digest` under `DIGEST_KEY`."""
    if settings is not None:
        if not hasattr(state, "_metadata"):
            state = OrderedDict(state)
            state._metadata = OrderedDict()  # type: ignore[attr-defined]
        state._metadata[SETTINGS_KEY] = plain(settings)  # type: ignore[attr-defined]
        state._metadata[DIGEST_KEY] = settings_digest(settings, state)  # type: ignore[attr-defined]
    return state


def settings_tampered(state: Any, path: str | os.PathLike) -> str | None:
    """Why the settings record of a checkpoint does not belong to its weights (edited after it was
    written), or None (it matches, or the file has no digest: written before bundle 0.6.0)."""
    saved = checkpoint_settings(state)
    found = getattr(state, "_metadata", None)
    digest = found.get(DIGEST_KEY) if isinstance(found, Mapping) else None
    if saved is None or digest is None:
        return None
    weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if digest != settings_digest(saved, weights):
        return (f"checkpoint {os.fspath(path)!r}: its settings record does not match its weights (edited after "
                "it was written?); the settings it claims cannot be trusted")
    return None


def checkpoint_settings(state: Any) -> dict[str, Any] | None:
    """The settings a model.pt was trained with (see `with_settings`), None for an older file."""
    found = getattr(state, "_metadata", None)
    found = found.get(SETTINGS_KEY) if isinstance(found, Mapping) else None
    return dict(found) if isinstance(found, Mapping) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def settings_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`setting: checkpoint X vs this run Y` for every setting that differs (nested names joined by `#`)."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key == "network":
            lines += settings_mismatch(a, b, "network_def#")
        elif not _same(a, b):
            lines.append(f"{name}: checkpoint {json.dumps(a)} vs this run {json.dumps(b)}")
    return lines


def check_network_weights(network: nn.Module, state: Any, path: str | os.PathLike,
                          settings: Mapping[str, Any] | None = None) -> Mapping[str, torch.Tensor]:
    """The state_dict of a checkpoint read by `safe_load` (plain or under a `model` key), once it is
    known to fit `network`: foreign weights, non-finite weights and, when both the file and `settings`
    record them, a checkpoint trained with other settings (network arguments, pixdim, spatial_size,
    channels, tasks, class names) raise CheckpointError naming the differences."""
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{os.fspath(path)!r} is not a state_dict of tensors")
    tampered = settings_tampered(state, path)
    if tampered:
        raise CheckpointError(tampered)
    saved = checkpoint_settings(state)
    if settings is not None and saved is None:
        logger.warning(f"checkpoint {os.fspath(path)} records no settings (written by an older bundle): "
                       "the network arguments, pixdim and spatial_size of this run are assumed to match it")
    elif settings is not None:
        diff = settings_mismatch(saved, plain(settings))
        if diff:
            raise CheckpointError(
                f"checkpoint {os.fspath(path)!r} was trained with other settings, which would change its "
                "predictions; use the training's values (override them on the command line):\n  " + "\n  ".join(diff))
    diff = describe_mismatch(network.state_dict(), state)
    if diff:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} was trained with another configuration (tasks, widths or channels):\n  "
            + "\n  ".join(diff))
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds NaN or infinite weights in {_summarise(bad)}; "
                              "it cannot give meaningful predictions")
    return state


def load_network_weights(network: nn.Module, path: str | os.PathLike,
                         map_location: str | torch.device = "cpu", settings: Mapping[str, Any] | None = None
                         ) -> nn.Module:
    """Load a state_dict checkpoint (plain or under a `model` key) into `network` after the checks
    of `check_network_weights`."""
    network.load_state_dict(check_network_weights(network, safe_load(path, map_location), path, settings))
    return network


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's `CheckpointLoader` for the bundle's model.pt (strict, `torch.load(weights_only=True)`),
    which first refuses, with a readable `CheckpointError`, a file that is missing, unreadable, of
    another network, with non-finite weights or trained with other `settings` (see
    `check_network_weights`).

    `load_dict` holds the network under one key (`{"model": network}`). Called with an engine it acts as
    the MONAI handler; called without one (`loader()`, as the configs' `initialize` does) it loads the
    weights right away, before any engine is built.
    """

    def __init__(self, load_path: str | os.PathLike, load_dict: dict, settings: Mapping[str, Any] | None = None,
                 map_location: Any = None, name: str | None = __name__) -> None:
        if len(load_dict) != 1 or not isinstance(next(iter(load_dict.values())), nn.Module):
            raise ValueError("CheckedCheckpointLoader loads one network: load_dict={'model': network}")
        super().__init__(load_path=os.fspath(load_path), load_dict=load_dict, name=name, map_location=map_location,
                         strict=True, strict_shape=True)
        self.settings = settings

    def __call__(self, engine: Engine | None = None) -> None:
        if not os.path.isfile(self.load_path):
            raise CheckpointError(f"no checkpoint at {self.load_path!r}: train first, or give --ckpt_path "
                                  "(inference.yaml, evaluate.yaml) or --load_pretrain false")
        network = next(iter(self.load_dict.values()))
        check_network_weights(network, safe_load(self.load_path, "cpu"), self.load_path, self.settings)
        super().__call__(engine if engine is not None else Engine(lambda e, b: None))  # a bare engine: weights only


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` holding NaN or Inf."""
    return sorted(k for k, v in state.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
