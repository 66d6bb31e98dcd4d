"""The bad-input pass and the datalist builder."""
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from scripts.data import DatalistError, load_datalist, validate_datalist
from scripts.prepare_datalist import assign_splits, build, main


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def good_case(tmp_path):
    """A valid 16^3 case with a mask; paths relative to tmp_path."""
    rng = np.random.default_rng(0)
    brain = np.zeros((16, 16, 16), np.int16)
    brain[3:13, 3:13, 3:13] = rng.integers(100, 1000, (10, 10, 10))
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[6:9, 6:9, 6:9] = 2
    for name, data in {"t1c": brain, "t2w": brain[::-1].copy(), "seg": seg}.items():
        _save(tmp_path / f"{name}.nii.gz", data)
    return {"case_id": "c1", "t1c": "t1c.nii.gz", "t2w": "t2w.nii.gz", "seg": "seg.nii.gz", "idh": 1, "grade": 0}


def _check(tmp_path, case, split="training"):
    return validate_datalist({split: [case]}, base_dir=tmp_path)


def test_good_case_passes_and_is_summarised(tmp_path, good_case):
    summary = _check(tmp_path, good_case)
    assert summary["training"] == {"cases": 1, "seg": 1, "1p19q": [0, 0], "idh": [0, 1], "grade": [1, 0]}


def _bad_inputs(tmp_path):
    """(field, case change, expected text) for every kind of bad input."""
    vol = np.ones((16, 16, 16), np.float32)
    nan = vol.copy()
    nan[0, 0, 0] = np.nan
    inf = vol.copy()
    inf[1, 1, 1] = np.inf
    (tmp_path / "notes.nii.gz").write_text("not an image")
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress((tmp_path / "t1c.nii.gz").read_bytes())[:200])
    (tmp_path / "scan.txt").write_text("x")
    far = np.eye(4)
    far[:3, 3] = 500.0
    small_fov = np.diag([1.0, 1.0, 1.0, 1.0])
    small_fov[:3, 3] = 12.0
    return [
        ("t1c", {"t1c": "missing.nii.gz"}, "file not found"),
        ("t2w", {"t2w": None}, "missing"),
        ("t2w", {"t2w": "notes.nii.gz"}, "unreadable"),
        ("t1c", {"t1c": "trunc.nii.gz"}, "unreadable"),
        ("t2w", {"t2w": "scan.txt"}, "not a NIfTI"),
        ("t1c", {"t1c": _save(tmp_path / "v4d.nii.gz", np.ones((16, 16, 16, 2)))}, "3D"),
        ("t2w", {"t2w": _save(tmp_path / "v2d.nii.gz", np.ones((16, 16)))}, "3D"),
        ("t1c", {"t1c": _save(tmp_path / "nan.nii.gz", nan)}, "NaN or Inf"),
        ("t2w", {"t2w": _save(tmp_path / "inf.nii.gz", inf)}, "NaN or Inf"),
        ("t2w", {"t2w": _save(tmp_path / "zero.nii.gz", np.zeros((16, 16, 16), np.int16))}, "all-zero"),
        ("seg", {"seg": _save(tmp_path / "zseg.nii.gz", np.zeros((16, 16, 16), np.uint8))}, "all-zero"),
        ("idh", {"idh": 2}, "0 or 1"),
        ("grade", {"grade": "HGG"}, "0 or 1"),
        ("1p19q", {"1p19q": 0.5}, "0 or 1"),
        ("seg", {"seg": _save(tmp_path / "far.nii.gz", np.ones((16, 16, 16), np.uint8), far)}, "T1C grid"),
        ("t2w", {"t2w": _save(tmp_path / "fov.nii.gz", vol, small_fov)}, "T1C grid"),
    ]


def test_each_bad_input_names_case_and_field(tmp_path, good_case):
    for field, change, text in _bad_inputs(tmp_path):
        case = {k: v for k, v in {**good_case, **change}.items() if v is not None}
        with pytest.raises(DatalistError) as err:
            _check(tmp_path, case, "validation")
        assert (err.value.case, err.value.field, err.value.split) == ("c1", field, "validation"), change
        assert text in str(err.value) and "'c1'" in str(err.value) and f"'{field}'" in str(err.value)


def test_mask_and_t2w_on_other_grids_that_overlap_pass(tmp_path, good_case):
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])  # coarser grid over the same field of view
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[3:5, 3:5, 3:5] = 1
    t2 = np.zeros((8, 8, 8), np.int16)
    t2[1:7, 1:7, 1:7] = 300
    case = {**good_case, "seg": _save(tmp_path / "seg2.nii.gz", seg, shifted),
            "t2w": _save(tmp_path / "t2w2.nii.gz", t2, shifted)}
    assert _check(tmp_path, case)["training"]["seg"] == 1


def test_duplicate_case_is_refused(tmp_path, good_case):
    with pytest.raises(DatalistError, match="twice") as err:
        validate_datalist({"training": [good_case], "testing": [good_case]}, base_dir=tmp_path)
    assert err.value.field == "case_id" and err.value.split == "testing"


def _case_folders(root):
    """Two BraTS-layout cases, three plain-layout ones (one without mask), and a non-case folder."""
    rng = np.random.default_rng(1)
    for i in range(5):
        brats = i < 2
        name = f"BraTS_{i}" if brats else f"p{i}"
        folder = root / name
        folder.mkdir(parents=True)
        vol = np.zeros((12, 12, 12), np.int16)
        vol[2:10, 2:10, 2:10] = rng.integers(50, 500, (8, 8, 8))
        seg = np.zeros((12, 12, 12), np.uint8)
        seg[4:7, 4:7, 4:7] = 4
        files = ({"t1ce": vol, "t2": vol, "seg": seg} if brats else
                 {"t1c": vol, "t2w": vol, **({"seg": seg} if i != 4 else {})})
        for suffix, data in files.items():
            _save(folder / (f"{name}_{suffix}.nii.gz" if brats else f"{suffix}.nii"), data)
    (root / "docs").mkdir()


def test_build_from_both_layouts_with_labels_and_check(tmp_path, capsys):
    _case_folders(tmp_path / "cases")
    (tmp_path / "labels.csv").write_text("case_id,idh,grade,1p19q\np2,1,0,\np3,0,1,0\np4,,1,\n")
    out = build(str(tmp_path / "cases"), str(tmp_path / "labels.csv"), str(tmp_path / "dl" / "datalist.json"),
                val_fraction=0.2, test_fraction=0.2, seed=3)
    content = json.loads((tmp_path / "dl" / "datalist.json").read_text())
    cases = {c["case_id"]: c for s in ("training", "validation", "testing") for c in content[s]}
    assert sorted(cases) == ["BraTS_0", "BraTS_1", "p2", "p3", "p4"]
    assert cases["BraTS_0"]["t1c"] == "../cases/BraTS_0/BraTS_0_t1ce.nii.gz" and "seg" in cases["BraTS_1"]
    assert cases["p3"]["t2w"].endswith("p3/t2w.nii") and "seg" not in cases["p4"]
    assert (cases["p2"].get("idh"), cases["p2"].get("grade"), "1p19q" in cases["p2"]) == (1, 0, False)
    resolved = {c["case_id"]: c for s in ("training", "validation", "testing") for c in load_datalist(out, s)}
    assert resolved["p4"]["t1c"] == str(tmp_path / "cases" / "p4" / "t1c.nii")
    main(check=out)
    assert '"ok": true' in capsys.readouterr().out


def test_build_rejects_bad_labels_and_unknown_cases(tmp_path):
    _case_folders(tmp_path / "cases")
    (tmp_path / "bad.csv").write_text("case_id,idh\np2,mutant\n")
    with pytest.raises(DatalistError, match="'idh'"):
        build(str(tmp_path / "cases"), str(tmp_path / "bad.csv"), str(tmp_path / "d.json"))
    (tmp_path / "ghost.csv").write_text("case_id,idh\nghost,1\n")
    with pytest.raises(DatalistError, match="'ghost'"):
        build(str(tmp_path / "cases"), str(tmp_path / "ghost.csv"), str(tmp_path / "d.json"))
    (tmp_path / "cases" / "p3" / "t2w.nii").unlink()
    with pytest.raises(DatalistError, match="'p3', field 't2w'"):
        build(str(tmp_path / "cases"), None, str(tmp_path / "d.json"))


def test_split_is_seeded_stratified_and_folds_partition():
    cases = [{"idh": i % 2, **({"seg": "x"} if i % 5 == 0 else {})} for i in range(200)]
    splits = assign_splits(cases, ["idh"], 0.2, 0.1, folds=0, fold=0, seed=0)
    assert splits == assign_splits(cases, ["idh"], 0.2, 0.1, folds=0, fold=0, seed=0)
    assert splits != assign_splits(cases, ["idh"], 0.2, 0.1, folds=0, fold=0, seed=1)
    for name, share in (("testing", 0.1), ("validation", 0.2), ("training", 0.7)):
        members = [c for c, s in zip(cases, splits) if s == name]
        assert abs(len(members) - share * 200) <= 3
        assert abs(sum(c["idh"] for c in members) - len(members) / 2) <= 2
    folds = [assign_splits(cases, ["idh"], 0.0, 0.1, folds=5, fold=k, seed=0) for k in range(5)]
    assert all(f.count("testing") == folds[0].count("testing") for f in folds)
    val_sets = [{i for i, s in enumerate(f) if s == "validation"} for f in folds]
    assert sum(map(len, val_sets)) == len(set().union(*val_sets)) == 200 - folds[0].count("testing")
