"""Task-balanced sampling, the training batch format, and resuming the loader."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from scripts.data import TaskBalancedBatchSampler, TaskBalancedLoader, augmentation, segmentation_loader
from scripts.data.sampler import allocate

TASKS = ["1p19q", "idh", "grade"]


def _cohort(n=120):
    """Cases with partial labels (pattern by index) and a separate segmentation group."""
    cases = []
    for i in range(n):
        case = {"case_id": f"c{i}", "t1c": "-", "t2w": "-"}
        if i % 3 != 0:
            case["idh"] = int(i % 4 == 1)
        if i % 2 == 0:
            case["grade"] = int(i % 8 < 5)
        if i % 5 == 0:
            case["1p19q"] = int(i % 10 == 0)
        if i >= n - 20:
            case = {"case_id": f"s{i}", "t1c": "-", "t2w": "-", "seg": "-"}
        cases.append(case)
    return cases


class FakeDataset:
    """Stands in for a MONAI dataset of preprocessed items (8^3, image value = case index)."""

    def __init__(self, cases):
        self.data = cases

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        case = self.data[i]
        seg = torch.zeros(1, 8, 8, 8)
        seg[0, 2:5, 2:5, 2:5] = 1.0 if "seg" in case else 0.0
        return {"image": torch.full((2, 8, 8, 8), float(i)), "seg": seg, "has_seg": torch.tensor("seg" in case),
                "label": torch.tensor([case.get(t, -1) for t in TASKS]), "case_id": case["case_id"]}


def test_every_batch_is_balanced_in_task_order():
    cases = _cohort()
    sampler = TaskBalancedBatchSampler(cases, TASKS, samples_per_class=2, seg_samples=1, iters_per_epoch=50)
    for batch in sampler:
        assert [role for _, role, _, _ in batch] == ["1p19q"] * 4 + ["idh"] * 4 + ["grade"] * 4 + ["seg"]
        for t, task in enumerate(TASKS):
            assert [cases[i][task] for i, _, _, _ in batch[4 * t:4 * t + 4]] == [0, 0, 1, 1]
        assert "seg" in cases[batch[-1][0]]


def test_streams_cover_their_cases_uniformly_across_epochs():
    cases = _cohort()
    sampler = TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=7, seed=3)
    counts = Counter()
    for epoch in range(60):
        sampler.set_epoch(epoch)
        counts.update((i, role) for batch in sampler for i, role, _, _ in batch)
    idh0 = [i for i, c in enumerate(cases) if c.get("idh") == 0]
    draws = [counts[(i, "idh")] for i in idh0]
    assert min(draws) >= max(draws) - 1 and sum(draws) == 420  # endless stream: whole passes in turn


def test_task_ratios_set_each_task_pool_and_keep_class_shares():
    cases = _cohort(400)
    sampler = TaskBalancedBatchSampler(cases, TASKS, task_ratios=[1, 1, 5], base_cases=6, iters_per_epoch=400)
    pools = {task: {i for c in (0, 1) for i in sampler.streams[f"{task}={c}"]} for task in TASKS}
    assert [len(pools[t]) for t in TASKS] == [6, 6, 30]
    drawn = Counter((i, role) for batch in sampler for i, role, _, _ in batch)
    assert {i for i, role in drawn if role == "grade"} == pools["grade"]
    grade = [cases[i]["grade"] for i in pools["grade"]]
    all_grade = [c["grade"] for c in cases if "grade" in c]
    assert abs(sum(grade) / len(grade) - sum(all_grade) / len(all_grade)) < 0.05
    assert allocate(10, [30, 10]) == [8, 2] and allocate(50, [3, 4]) == [3, 4]


def test_ranks_draw_from_disjoint_shards():
    cases = _cohort()
    shards = [TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=30, rank=r, world_size=2, parts=2) for r in (0, 1)]
    seen = [{(i, role) for batch in s for i, role, _, _ in batch} for s in shards]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(ValueError, match="1p19q=1"):
        TaskBalancedBatchSampler([c for c in cases if c.get("1p19q") != 1], TASKS)


def test_surrogate_parts_take_their_own_balanced_batches():
    cases = _cohort()
    single = TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=2, seed=2)
    parted = TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=2, seed=2, parts=3)
    steps = list(parted)
    parted.set_epoch(1, 1)
    assert list(parted) == [TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=2, seed=2, parts=3).batch(1, 1)]
    assert [d[3] for d in steps[0]] == [0] * 7 + [1] * 7 + [2] * 7
    for step in steps:
        for part in range(3):
            rows = [d for d in step if d[3] == part]
            assert [role for _, role, _, _ in rows] == ["1p19q"] * 2 + ["idh"] * 2 + ["grade"] * 2 + ["seg"]
            assert [cases[i][role] for i, role, _, _ in rows[:6]] == [0, 1] * 3
    # paired data order: part 0 is the batch that parts=1 gives (cases and augmentation seeds)
    assert [[d[:3] for d in step if d[3] == 0] for step in steps] == [[d[:3] for d in b] for b in single][:2]
    for step in steps:                                         # the surrogate parts draw their own cases and seeds
        cases_of = [[d[0] for d in step if d[3] == p] for p in range(3)]
        assert cases_of[0] != cases_of[1] and cases_of[0] != cases_of[2] and cases_of[1] != cases_of[2]
        assert len({d[2] for d in step}) == len(step)
    with pytest.raises(ValueError, match="parts"):
        TaskBalancedBatchSampler(cases, TASKS, parts=0)
    batch = next(iter(TaskBalancedLoader(FakeDataset(cases), TASKS, None, iters_per_epoch=2, seed=2,
                                         surrogate_batches=2)))
    assert batch["part"].tolist() == [0] * 7 + [1] * 7 + [2] * 7 and batch["has_seg"].sum() == 3


def test_sampler_is_a_function_of_seed_epoch_iteration():
    cases = _cohort()
    a = TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=10, seed=5)
    b = TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=10, seed=5)
    a.set_epoch(3)
    b.set_epoch(3, iteration=4)
    assert list(a)[4:] == list(b)
    assert list(a) != list(TaskBalancedBatchSampler(cases, TASKS, iters_per_epoch=10, seed=6))


def test_training_batch_format_and_missing_labels_never_give_a_loss():
    cases = _cohort()
    loader = TaskBalancedLoader(FakeDataset(cases), TASKS, None, iters_per_epoch=3, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and loader.state_dict()["epoch"] == 1
    b = batches[0]
    assert b["image"].shape == (7, 2, 8, 8, 8) and b["image"].dtype == torch.float32
    assert b["part"].tolist() == [0] * 7
    assert b["seg"].shape == (7, 1, 8, 8, 8) and b["label"].dtype == torch.int64
    assert b["has_seg"].tolist() == [False] * 6 + [True] and b["seg"][:6].sum() == 0 and b["seg"][6].sum() > 0
    for row in range(7):
        case = cases[int(b["image"][row, 0, 0, 0, 0])]
        assert b["case_id"][row] == case["case_id"]  # the batch names its cases
        known = (b["label"][row] >= 0).nonzero().flatten().tolist()
        assert known == ([] if row == 6 else [row // 2])
        assert all(b["label"][row, t] == case[TASKS[t]] for t in known)
    # a cross-entropy that ignores -1 takes no gradient from rows without the task's label
    logits = torch.randn(7, 2, requires_grad=True)
    F.cross_entropy(logits, b["label"][:, 1], ignore_index=-1).backward()
    assert logits.grad[[0, 1, 4, 5, 6]].abs().sum() == 0 and logits.grad[[2, 3]].abs().sum() > 0


def test_loader_resumes_exactly_from_its_state():
    cases = _cohort()

    def make():
        return TaskBalancedLoader(FakeDataset(cases), TASKS, augmentation(flip_axes=(0, 1, 2), affine_prob=1.0),
                                  iters_per_epoch=4, seed=2)

    first = make()
    list(first)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "iteration": 1, "seed": 2}
    expected = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    for want, got in zip(expected, resumed):
        assert want["case_id"] == got["case_id"]
        assert all(torch.equal(want[k], got[k]) for k in want if k != "case_id")
    resumed.set_epoch(1, 4)
    assert resumed.state_dict()["epoch"] == 2
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({**state, "seed": 9})


def test_segmentation_loader_gives_masked_rows_without_labels():
    cases = _cohort()
    batches = list(segmentation_loader(FakeDataset(cases), TASKS, max_cases=5, batch_size=2))
    assert [len(b["image"]) for b in batches] == [2, 2, 1]
    assert all(b["has_seg"].all() and (b["label"] == -1).all() and b["seg"].sum() > 0 for b in batches)
