"""Datasets and loaders that turn preprocessed cases into the batches of the data contract.

Training: :class:`TaskBalancedLoader` (a :class:`~.sampler.TaskBalancedBatchSampler` over one
MONAI dataset of all training cases, rows made by :class:`TaskRows`, stacked by
:func:`collate_rows`). Validation: a plain ``monai.data.DataLoader`` over :func:`make_dataset`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, LoadImaged
from torch.utils.data import DataLoader

from .sampler import SEG_ROLE, Draw, TaskBalancedBatchSampler
from .transforms import MISSING

CACHE_MODES = ("none", "memory", "disk")


def transform_hash(transforms: Sequence[Any]) -> bytes:
    """Hash of the deterministic transforms' settings, for PersistentDataset file names (a
    loader's reader objects, whose state changes as they read, count by their keys only)."""
    parts = [repr((type(t).__qualname__, t.keys)).encode() if isinstance(t, LoadImaged) else pickle.dumps(t)
             for t in transforms]
    return hashlib.sha256(b"".join(parts)).hexdigest().encode()


def make_dataset(data: Sequence[Mapping[str, Any]], transform: Compose, cache: str = "none",
                 cache_dir: str | os.PathLike | None = None, num_workers: int = 0) -> Dataset:
    """A MONAI dataset of ``data`` through ``transform``.

    ``cache``: ``none`` (decode every time), ``memory`` (CacheDataset: the deterministic part of
    ``transform`` once, kept in RAM) or ``disk`` (PersistentDataset under ``cache_dir``; its file
    names hash the data item and the deterministic transforms, so a changed size re-caches).
    """
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, num_workers=num_workers or None, copy_cache=False, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache 'disk' needs a cache_dir")
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=transform_hash,
                                 track_meta=True, weights_only=False)
    raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class TaskRows(torch.utils.data.Dataset):
    """Turns a draw ``(case index, role, seed, part)`` into one training row of the contract.

    A task role keeps only that task's label (others ``-1``) and ``has_seg`` False; the ``seg`` role
    keeps the mask with ``has_seg`` True and every label ``-1``. ``augmentation`` (random, seeded by
    the draw) runs on plain tensors, so cached items are never modified.
    """

    def __init__(self, dataset: Dataset, tasks: Sequence[str], augmentation: Callable | None = None):
        self.dataset, self.tasks, self.augmentation = dataset, list(tasks), augmentation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: Draw) -> dict[str, Any]:
        index, role, seed, part = draw
        item = self.dataset[index]
        row = {"image": _plain(item["image"]), "seg": _plain(item["seg"])}
        if self.augmentation is not None:
            self.augmentation.set_random_state(seed=seed)
            row = self.augmentation(row)
        label = torch.full((len(self.tasks),), MISSING, dtype=torch.int64)
        if role != SEG_ROLE:
            t = self.tasks.index(role)
            label[t] = item["label"][t]
        elif not bool(item["has_seg"]):
            raise ValueError(f"case {item.get('case_id')} drawn for segmentation has no mask")
        return {"image": _plain(row["image"]).float(), "label": label,
                "seg": _plain(row["seg"]).float() if role == SEG_ROLE else torch.zeros_like(_plain(row["seg"])),
                "has_seg": torch.tensor(role == SEG_ROLE), "part": torch.tensor(part),
                "case_id": str(item.get("case_id", index))}


BATCH_KEYS = ("image", "label", "seg", "has_seg", "part")  # the tensors of a training batch (`collate_rows`)


def collate_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack rows into a batch ``{image [B,C,*S], label [B,T], seg [B,1,*S], has_seg [B], part [B],
    case_id [B]}`` (``part``: 0 for the main step's rows, s for surrogate step s's; ``case_id`` a list
    of strings, so that a warning can name the cases)."""
    batch: dict[str, Any] = {key: torch.stack([r[key] for r in rows]) for key in BATCH_KEYS}
    batch["case_id"] = [r["case_id"] for r in rows]
    return batch


class TaskBalancedLoader:
    """The training loader: ``iters_per_epoch`` task-balanced batches per pass, then the next epoch.

    Args:
        dataset: MONAI dataset over all training cases (its ``data`` are the datalist entries)
            with the deterministic preprocessing.
        tasks: task names in batch order.
        augmentation: random transforms applied per row (seeded from the draw), or None.
        num_workers: DataLoader worker processes (kept alive across epochs).
        surrogate_batches: extra task-balanced batches per step, one per STDGP surrogate step that
            takes its own data (the strategy's ``surrogate_batches``); their rows have ``part`` 1, 2, ...
        other arguments: see :class:`~.sampler.TaskBalancedBatchSampler`.

    Its position is ``(epoch, iteration)`` = batches handed out so far in the current epoch:
    ``state_dict()`` / ``load_state_dict()`` or ``set_epoch(epoch, iteration)`` restore it exactly.
    """

    def __init__(self, dataset: Dataset, tasks: Sequence[str], augmentation: Callable | None = None,
                 iters_per_epoch: int = 100, samples_per_class: int = 1, seg_samples: int = 1,
                 task_ratios: Sequence[int] | None = None, base_cases: int = 48, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, surrogate_batches: int = 0):
        self.sampler = TaskBalancedBatchSampler(
            dataset.data, tasks, samples_per_class=samples_per_class, seg_samples=seg_samples,
            iters_per_epoch=iters_per_epoch, task_ratios=task_ratios, base_cases=base_cases, seed=seed,
            parts=1 + int(surrogate_batches), rank=rank, world_size=world_size)
        self.rows = TaskRows(dataset, tasks, augmentation)
        # its own generator: starting an epoch's iterator must not draw from the global RNG, so that a
        # resumed run (which starts its iterator at another point) consumes the global RNG identically
        self.loader = DataLoader(self.rows, batch_sampler=self.sampler, collate_fn=collate_rows,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(int(seed)))
        self.iters_per_epoch, self.seed = int(iters_per_epoch), int(seed)
        self.epoch, self.iteration = 0, 0

    def __len__(self) -> int:
        return self.iters_per_epoch

    def set_epoch(self, epoch: int, iteration: int = 0) -> None:
        """Continue at batch ``iteration`` of ``epoch`` (a finished epoch rolls over to the next)."""
        epoch, iteration = int(epoch), int(iteration)
        self.epoch, self.iteration = (epoch + 1, 0) if iteration >= self.iters_per_epoch else (epoch, iteration)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "iteration": self.iteration, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.set_epoch(state["epoch"], state["iteration"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.set_epoch(self.epoch, self.iteration)
        for batch in self.loader:
            self.iteration += 1
            yield batch
        self.set_epoch(self.epoch, self.iteration)


def segmentation_loader(dataset: Dataset, tasks: Sequence[str], max_cases: int | None = None,
                        batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """Un-augmented batches of the training cases that have a mask (for the DPA prototype
    initialisation), in datalist order, at most ``max_cases`` of them."""
    draws = [(i, SEG_ROLE, 0, 0) for i, c in enumerate(dataset.data) if "seg" in c][:max_cases]
    return DataLoader(TaskRows(dataset, tasks), batch_size=batch_size, sampler=draws, collate_fn=collate_rows,
                      num_workers=num_workers)
