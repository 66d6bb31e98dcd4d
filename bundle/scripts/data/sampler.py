"""Task-balanced batches: per task an endless stream of its class-0 and of its class-1 cases, plus a
stream of segmentation cases; a batch takes ``k`` of each class per task, in task order, then the
segmentation rows. A training step may take several such batches at once (``parts``: the main
step's batch, then one per STDGP surrogate step), stacked as one batch whose rows carry their part.

Every draw is a pure function of ``(seed, epoch, iteration)``: the position of a draw in its stream
is ``(epoch * iters_per_epoch + iteration) * k + j``, and each pass over a stream is a fresh seeded
permutation. So the sampler restarts anywhere from ``set_epoch(epoch, iteration)``.

Paired data order: part 0 (the main batch) walks the streams seeded by ``(seed, stream)`` and its
augmentation seeds come from ``(seed, rank, step)`` alone, so a strategy with surrogate parts sees
the same main batches, with the same augmentations, as one without (``parts=1``) under the same
seed. Surrogate part ``p >= 1`` walks its own streams over the same cases, seeded by
``(seed, stream, p)``, with its own augmentation seeds ``(seed, rank, step, p)``.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .datalist import SEG_KEY

SEG_ROLE = "seg"
Draw = tuple[int, str, int, int]  # (case index, role: a task name or "seg", augmentation seed, part)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def allocate(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` (at most ``sum(sizes)``) over groups in proportion to ``sizes``, largest
    remainders first."""
    total = min(int(total), int(sum(sizes)))
    raw = [total * s / max(1, sum(sizes)) for s in sizes]
    counts = [min(int(r), s) for r, s in zip(raw, sizes)]
    for i in sorted(range(len(sizes)), key=lambda i: int(raw[i]) - raw[i]):
        if sum(counts) == total:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
    return counts


def task_pool(cases: Sequence[Mapping[str, Any]], task: str, size: int | None, seed: int) -> list[list[int]]:
    """Indices of the class-0 and class-1 cases of ``task``; with ``size``, a seeded subset of that
    many cases that keeps the class proportions (the reference's task-ratio setting)."""
    classes = [[i for i, c in enumerate(cases) if c.get(task) == k] for k in (0, 1)]
    if size is None:
        return classes
    counts = allocate(size, [len(c) for c in classes])
    rng = _rng(seed, zlib.crc32(task.encode()))
    return [sorted(rng.choice(c, n, replace=False).tolist()) for c, n in zip(classes, counts)]


class TaskBalancedBatchSampler:
    """Yields per step a list of :data:`Draw`: for each part (0 = the main batch, then one per
    surrogate step), task 0's ``k`` class-0 then ``k`` class-1 draws, task 1's, ..., then
    ``seg_samples`` segmentation draws.

    Args:
        cases: the training cases (resolved datalist entries).
        tasks: task names in batch order.
        samples_per_class: ``k``.
        seg_samples: segmentation rows per batch (0 for none).
        iters_per_epoch: batches per epoch.
        task_ratios: per task (same order) a multiple of ``base_cases``: the number of that task's
            cases used in training (class proportions kept), e.g. ``[1, 1, 5]``; None uses all.
        base_cases: cases per ratio unit (48 in the reference).
        seed: base seed of every draw.
        parts: task-balanced batches per step (1 + the STDGP surrogate steps that take their own batch).
        rank, world_size: each rank draws from its own disjoint share of every stream.
    """

    def __init__(self, cases: Sequence[Mapping[str, Any]], tasks: Sequence[str], samples_per_class: int = 1,
                 seg_samples: int = 1, iters_per_epoch: int = 100, task_ratios: Sequence[int] | None = None,
                 base_cases: int = 48, seed: int = 0, parts: int = 1, rank: int = 0, world_size: int = 1):
        if parts < 1:
            raise ValueError(f"parts must be at least 1 (the main batch), got {parts}")
        if task_ratios is not None and len(task_ratios) != len(tasks):
            raise ValueError(f"task_ratios {list(task_ratios)} needs one entry per task {list(tasks)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.tasks, self.k, self.seg_samples = list(tasks), int(samples_per_class), int(seg_samples)
        self.iters_per_epoch, self.seed, self.rank, self.parts = int(iters_per_epoch), int(seed), int(rank), int(parts)
        self.epoch, self.start = 0, 0
        pools: dict[str, list[int]] = {}
        for t, task in enumerate(self.tasks):
            size = None if task_ratios is None else int(task_ratios[t]) * int(base_cases)
            for k, members in enumerate(task_pool(cases, task, size, seed)):
                pools[f"{task}={k}"] = members
        if self.seg_samples:
            pools[SEG_ROLE] = [i for i, c in enumerate(cases) if SEG_KEY in c]
        self.streams: dict[str, np.ndarray] = {}
        for s, (name, members) in enumerate(pools.items()):
            shard = _rng(seed, s).permutation(np.asarray(members, dtype=np.int64))[rank::world_size]
            if len(shard) == 0:
                raise ValueError(f"training stream '{name}' has {len(members)} cases, too few for "
                                 f"{world_size} rank(s): every task needs cases of both classes"
                                 + (" and the segmentation stream masks" if name == SEG_ROLE else ""))
            self.streams[name] = shard
        self._stream_ids = {name: s for s, name in enumerate(self.streams)}

    def set_epoch(self, epoch: int, iteration: int = 0) -> None:
        """Position the sampler at batch ``iteration`` of ``epoch``."""
        self.epoch, self.start = int(epoch), int(iteration)

    def __len__(self) -> int:
        return self.iters_per_epoch - self.start

    def draw(self, stream: str, position: int, part: int = 0) -> int:
        """The case index at ``position`` of an endless stream, in the order of ``part`` (0: the main
        batch; each surrogate part has its own order)."""
        members = self.streams[stream]
        cycle, offset = divmod(position, len(members))
        words = (self.seed, self._stream_ids[stream], cycle) if part == 0 else (
            self.seed, self._stream_ids[stream], cycle, len(self.streams) + part)
        return int(members[_rng(*words).permutation(len(members))[offset]])

    def _augmentation_seeds(self, step: int, part: int, n: int) -> list[int]:
        """``n`` augmentation seeds of one part of a step (part 0's do not depend on ``parts``)."""
        words = (self.seed, self.rank, step, len(self.streams)) + ((part,) if part else ())
        return [int(s) for s in _rng(*words).integers(0, 2**31 - 1, n)]

    def batch(self, epoch: int, iteration: int) -> list[Draw]:
        """The draws of step ``iteration`` of ``epoch``, part by part."""
        step = epoch * self.iters_per_epoch + iteration
        plan = [(f"{task}={c}", task, self.k) for task in self.tasks for c in (0, 1)]
        if self.seg_samples:
            plan.append((SEG_ROLE, SEG_ROLE, self.seg_samples))
        draws: list[Draw] = []
        for part in range(self.parts):
            rows = [(self.draw(stream, step * n + j, part), role) for stream, role, n in plan for j in range(n)]
            aug = self._augmentation_seeds(step, part, len(rows))
            draws += [(i, role, s, part) for (i, role), s in zip(rows, aug)]
        return draws

    def __iter__(self) -> Iterator[list[Draw]]:
        epoch, start = self.epoch, self.start
        for iteration in range(start, self.iters_per_epoch):
            yield self.batch(epoch, iteration)
