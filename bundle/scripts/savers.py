"""model.pt through ignite: `Checkpoint` on an atomic `DiskSaver` whose files are synced and readable by all.

`ModelFile` is what the bundle's handlers call; `SharedDiskSaver` is ignite's `DiskSaver(atomic=True)` with
the two things it lacks here, and `ModelWithSettings` gives `Checkpoint` the state_dict with the settings record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver

from scripts.checkpoint import FILE_MODE, CheckpointWriteError, sync_folder, with_settings, write_failure


class SharedDiskSaver(DiskSaver):
    """ignite's `DiskSaver(atomic=True)`: the checkpoint goes to a temporary file in `dirname`, then
    `os.replace` puts it in place, on rank `save_on_rank` only. Added: the temporary file is flushed
    and fsynced before the rename and the folder after it (a power cut leaves the old file or the new
    one), and it gets mode 0644 (tempfile's 0600 would keep the model from the other users of a shared
    folder). `remove` does nothing: `Checkpoint` removes a file it saves again under the same name
    first, which would leave no file at all until the new one is written; the rename replaces it."""

    def __init__(self, dirname: str | os.PathLike, save_on_rank: int = 0) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        def write(obj: Any, f: Any, **kwargs: Any) -> None:
            func(obj, f, **kwargs)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())

        try:
            super()._save_func(checkpoint, path, write)
        except OSError as err:  # e.g. a full disk; ignite has removed its temporary file
            raise CheckpointWriteError(write_failure(path, err)) from None
        sync_folder(path.parent)

    def remove(self, filename: str) -> None:
        """Nothing: a file is only ever replaced, by the rename of the next save."""


class ModelWithSettings:
    """`network`'s state_dict carrying `settings` (see `scripts.checkpoint.with_settings`), for `Checkpoint`."""

    def __init__(self, network: torch.nn.Module, settings: Mapping[str, Any] | None = None) -> None:
        self.network, self.settings = network, settings

    def state_dict(self) -> dict[str, torch.Tensor]:
        return with_settings(self.network.state_dict(), self.settings)


class ModelFile:
    """Each call writes `network`'s state_dict with `settings` to `save_dir/filename` (rank 0 only):
    ignite's `Checkpoint` on a `SharedDiskSaver`, which keeps the one file under its fixed name. The
    caller decides when; the folder is made at the first save, not when the config is parsed."""

    def __init__(self, network: torch.nn.Module, save_dir: str | os.PathLike, filename: str = "model.pt",
                 settings: Mapping[str, Any] | None = None) -> None:
        self.path = Path(save_dir) / filename
        self.to_save = {"model": ModelWithSettings(network, settings)}
        self.checkpoint: Checkpoint | None = None

    def __call__(self, engine: Engine) -> None:
        if self.checkpoint is None:
            pattern = self.path.name.replace("{", "{{").replace("}", "}}")  # a literal name, not a template
            self.checkpoint = Checkpoint(self.to_save, SharedDiskSaver(self.path.parent), filename_pattern=pattern,
                                         n_saved=None)
        self.checkpoint(engine)
