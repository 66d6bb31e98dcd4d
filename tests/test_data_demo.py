"""The demo cohort: deterministic, biologically consistent labels, stated noise, visible phenotypes,
and usable end to end by the loaders."""
import json
import os
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor

from scripts.data import (
    TASKS,
    TaskBalancedLoader,
    augmentation,
    ensure_demo_cohort,
    load_datalist,
    make_dataset,
    preprocessing,
    validate_datalist,
)
from scripts.data.demo_cohort import generate_cohort, make_case, plan_cohort

SMALL = {"n_train_cls": 24, "n_train_seg": 4, "n_val": 4, "n_test": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "dataset"
    return ensure_demo_cohort(folder, seed=0, **SMALL)


def test_plan_labels_follow_the_biology_and_the_noise_rate():
    plan = plan_cohort(seed=0, noise_rate=0.05)
    assert plan == plan_cohort(seed=0, noise_rate=0.05) and plan != plan_cohort(seed=1)
    assert Counter(c["split"] for c in plan) == {"training": 190, "validation": 40, "testing": 40}
    for case in plan:
        truth = case["truth"]
        assert truth["idh"] == 1 or truth["1p19q"] == 0  # codeleted implies IDH-mutant
        assert case["labels"].items() <= truth.items()
    wildtype = [c["truth"]["grade"] for c in plan if c["truth"]["idh"] == 0]
    assert sum(wildtype) / len(wildtype) > 0.8  # IDH-wildtype mostly high grade
    for split, n in (("training", 190), ("validation", 40), ("testing", 40)):
        members = [c for c in plan if c["split"] == split]
        for task in TASKS:
            discordant = sum(c["phenotype"][task] != c["truth"][task] for c in members)
            assert discordant == round(0.05 * n)
    cls = [c for c in plan if c["role"] == "cls"]
    assert all(c["labels"] for c in cls) and sum(len(c["labels"]) < 3 for c in cls) > len(cls) / 2
    assert all(not c["labels"] for c in plan if c["role"] == "seg")
    assert all(len(c["labels"]) == 3 for c in plan if c["role"] == "eval")


def test_each_phenotype_shows_in_the_images():
    def features(phenotype, seed):
        images = make_case(np.random.default_rng(seed), phenotype)
        t1, t2, seg = (np.asanyarray(images[k].dataobj).astype(float) for k in ("t1c", "t2w", "seg"))
        wm = np.median(t1[(seg == 0) & (t1 > 0)])
        core = seg == 1
        dark = (t1 < 0.7 * np.median(t1[core])) & (t2 < 0.7 * np.median(t2[core]))
        specks = (dark & core).sum() / core.sum()
        return (seg == 4).sum() > 0 and t1[seg == 4].mean() > 1.3 * wm, specks, (seg == 2).sum() / (seg > 0).sum()

    for seed in range(3):
        high = features({"grade": 1, "idh": 0, "1p19q": 0}, seed)
        low = features({"grade": 0, "idh": 1, "1p19q": 1}, seed)
        assert high[0] and not low[0]  # enhancing rim only in high grade
        assert low[1] > 0.05 and high[1] < 0.01  # calcification specks only when codeleted
        assert high[2] > low[2] + 0.2  # wildtype: more edema
    first, again = (make_case(np.random.default_rng(7), {"grade": 1, "idh": 1, "1p19q": 0}, t2w_slice_mm=6.0, lps=True)
                    for _ in range(2))
    for key in first:
        assert np.array_equal(first[key].dataobj, again[key].dataobj)
        assert np.array_equal(first[key].affine, again[key].affine)
    assert nib.aff2axcodes(first["t1c"].affine) == ("L", "P", "S") and first["t2w"].shape[2] < first["t1c"].shape[2]


def test_generation_is_deterministic(tmp_path):
    tiny = {"n_train_cls": 2, "n_train_seg": 1, "n_val": 1, "n_test": 1}
    paths = [generate_cohort(tmp_path / name, seed=4, **tiny) for name in ("a", "b")]
    assert open(paths[0]).read() == open(paths[1]).read()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "cases").rglob("*.nii.gz"))
    assert len(files) == 2 * 2 + 3 * 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_ensure_generates_once_and_respects_other_folders(cohort, tmp_path):
    mtime = os.path.getmtime(cohort)
    assert ensure_demo_cohort(os.path.dirname(cohort)) == cohort
    assert os.path.getmtime(cohort) == mtime
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "scan.nii.gz").write_text("x")
    with pytest.raises(FileExistsError):
        ensure_demo_cohort(tmp_path / "user")
    summary = validate_datalist(cohort)
    assert summary["training"]["cases"] == 28 and summary["training"]["seg"] == 4
    assert summary["validation"] == {"cases": 4, "seg": 4, **{t: summary["validation"][t] for t in TASKS}}
    manifest = json.loads(open(cohort.replace("datalist.json", "cohort.json")).read())
    assert manifest["noise_rate"] == 0.05 and len(manifest["cases"]) == 34


def test_demo_cohort_feeds_both_loaders(cohort):
    chain = preprocessing(4.0, (48, 48, 48))
    train = make_dataset(load_datalist(cohort, "training"), chain, cache="memory")
    batch = next(iter(TaskBalancedLoader(train, TASKS, augmentation(), iters_per_epoch=2, seed=0)))
    assert batch["image"].shape == (7, 2, 48, 48, 48) and type(batch["image"]) is torch.Tensor
    assert batch["has_seg"].tolist() == [False] * 6 + [True] and batch["seg"][6].sum() > 0
    val = DataLoader(make_dataset(load_datalist(cohort, "validation"), chain), batch_size=2)
    vb = next(iter(val))
    assert isinstance(vb["image"], MetaTensor) and vb["image"].shape == (2, 2, 48, 48, 48)
    assert (vb["label"] >= 0).all() and vb["has_seg"].all() and vb["seg"].sum() > 0
    assert len(vb["image"].applied_operations) == 2 and len(vb["case_id"]) == 2
