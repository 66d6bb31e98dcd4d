"""Second round of hostile inputs (docs/reliability.md): what the network sees, what inference writes,
what it tells. One test per numbered item of the round, named after it."""
import csv
import errno
import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from test_inference_safety import brats_case as brats_like_case
from test_inference_safety import checkpoint, failure, workflow
from torch import nn

from scripts.calibration import Calibration, CalibrationError, read_temperatures, store_calibration
from scripts.checkpoint import CheckpointError, atomic_save, check_network_weights, safe_load, with_settings
from scripts.data import DatalistError, check_case, find_cases, load_datalist
from scripts.data.datalist import DatalistFileError, datalist_fingerprint, write_datalist
from scripts.data.demo_cohort import make_case
from scripts.data.transforms import BrainZScored, RobustIntensityd, preprocessing_transforms
from scripts.errors import bundle_error, message
from scripts.handlers import TrainingState
from scripts.inference import (
    CaseCheck,
    InferenceError,
    OutputExistsError,
    OutputWriteError,
    PredictionWriter,
    atomic_write,
    inference_cases,
    skull_problem,
)
from scripts.jsonio import strict_json
from scripts.metrics import classification_report
from scripts.options import TrainingLockError
from scripts.prepare_datalist import build, read_labels
from scripts.savers import SharedDiskSaver

AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])
TINY_CHAIN = dict(pixdim=[6.0, 6.0, 6.0], spatial_size=[32, 32, 32])  # the tiny case's own grid: no resampling


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, header: nib.Nifti1Header | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine, header), str(path))
    return str(path)


def save_scaled(path: Path, data: np.ndarray, slope: float) -> str:
    """An uncompressed NIfTI whose header scales the stored `data` by `slope` (nibabel would recompute it)."""
    header = nib.Nifti1Image(data, AFFINE).header
    header["scl_slope"], header["scl_inter"], header["vox_offset"] = slope, 0.0, 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * (352 - f.tell()) + np.asfortranarray(data).tobytes(order="F"))
    return str(path)


def brain(seed: int = 0, shape=(32, 32, 32)) -> np.ndarray:
    vol = np.zeros(shape, np.float32)
    vol[6:26, 6:26, 6:26] = np.random.default_rng(seed).uniform(100, 1000, (20, 20, 20))
    return vol


def tiny_case(folder: Path, t1c: np.ndarray | None = None, t2w: np.ndarray | None = None, **save_args) -> dict:
    t1c = brain(0) if t1c is None else t1c
    t2w = brain(1) if t2w is None else t2w
    return {"case_id": folder.name, "t1c": save(folder / "t1c.nii.gz", t1c, **save_args),
            "t2w": save(folder / "t2w.nii.gz", t2w, **save_args)}


def network_input(case: dict, chain: list | None = None, **sizes) -> torch.Tensor:
    transforms = preprocessing_transforms(**(sizes or TINY_CHAIN)) if chain is None else chain
    return Compose(transforms)({k: case[k] for k in ("t1c", "t2w")})["image"].as_tensor()


def printed(capfd) -> str:
    """What the bundle's logging printed since the last call (its config logs to stdout)."""
    out = capfd.readouterr()
    return out.out + out.err


def problems(cases: list[dict], **kwargs) -> dict[str, str]:
    check = CaseCheck(cases, **kwargs)
    return {e["case_id"]: f"{e['field']}: {e['problem']}" for e in check.errors}


class ZScoreOfBundle050(MapTransform):
    """BrainZScored as bundle 0.5.0 computed it (brain = |T1C| above 1e-6 of its maximum), kept here to
    prove that the chain's input is unchanged on clean data."""

    def __call__(self, data):
        d = dict(data)
        img = d["image"]
        src = img.as_tensor().to(torch.float32)
        ref = src[0].abs()
        mask = ref > 1e-6 * ref.max()
        res = torch.zeros_like(src)
        for c in range(src.shape[0]):
            values = src[c][mask]
            if values.numel():
                std = values.std(unbiased=False)
                res[c][mask] = (values - values.mean()) / (std if std > 0 else 1.0)
        d["image"] = MetaTensor(res, meta=dict(img.meta))
        return d


def chain_of_bundle050(**sizes) -> list:
    """The preprocessing chain of bundle 0.5.0: no RobustIntensityd, the old z-score."""
    chain = [t for t in preprocessing_transforms(**sizes) if not isinstance(t, RobustIntensityd)]
    return [ZScoreOfBundle050(keys="image") if isinstance(t, BrainZScored) else t for t in chain]


def demo_cases(root: Path) -> list[dict]:
    """Three demo-cohort cases as the generator writes them: plain, T2W on 6 mm slices, LPS."""
    cases = []
    for i, extra in enumerate([{}, {"t2w_slice_mm": 6.0}, {"lps": True}]):
        images = make_case(np.random.default_rng(i), {"grade": i % 2, "idh": 1, "1p19q": 0}, **extra)
        folder = root / f"demo{i}"
        folder.mkdir(parents=True)
        for key in ("t1c", "t2w"):
            nib.save(images[key], str(folder / f"{key}.nii.gz"))
        cases.append({"case_id": f"demo{i}", "t1c": str(folder / "t1c.nii.gz"), "t2w": str(folder / "t2w.nii.gz")})
    return cases


# -- item 2: the network never answers an empty input; outliers do not move it -------------------------------------

def test_item2_clean_input_is_bit_for_bit_unchanged(tmp_path, brats_case):
    """On clean data (demo cohort, BraTS) the network's input is exactly bundle 0.5.0's, in every workflow
    (they share the chain): the outlier clipping and the background shift leave clean scans alone."""
    for case in demo_cases(tmp_path):
        for sizes in ({"pixdim": [4.0] * 3, "spatial_size": [48, 48, 48]},  # demo.yaml
                      {"pixdim": [1.0] * 3, "spatial_size": [160, 192, 160]}):  # train/inference.yaml
            new, old = network_input(case, **sizes), network_input(case, chain_of_bundle050(**sizes))
            assert new.dtype == old.dtype and torch.equal(new, old), (case["case_id"], sizes)
    sizes = {"pixdim": [1.0] * 3, "spatial_size": [160, 192, 160]}
    new, old = network_input(brats_case, **sizes), network_input(brats_case, chain_of_bundle050(**sizes))
    assert torch.equal(new, old) and float(new.abs().sum()) > 0
    assert not problems([{**brats_case, "case_id": "brats"}])


def test_item2_outlier_voxel_refused_or_clipped(tmp_path):
    clean = tiny_case(tmp_path / "clean")
    reference = network_input(clean)
    for value in (1e7, 1e12):  # one voxel: clipped, the rest of the brain as without it
        t1c = brain(0)
        t1c[10, 10, 10] = value
        case = tiny_case(tmp_path / f"hot{value:.0e}", t1c)
        seen = network_input(case)
        off = torch.ones_like(seen, dtype=torch.bool)
        off[:, 10, 10, 10] = False
        assert float((seen - reference)[off].abs().max()) < 0.1, value  # 8000 voxels: one clipped moves 0.04 SD
        assert float(seen[0, 10, 10, 10]) < 30  # not 161 SD away
        assert not problems([case])
        old = network_input(case, chain_of_bundle050(**TINY_CHAIN))  # the 0.5.0 chain: brain at ~0
        assert float((old - reference)[off].abs().max()) > 0.5
    # many extreme voxels (2% of the brain): the brain the network would see is implausibly small: refused
    t1c = brain(0)
    t1c[6:26, 6:26, 6] = 1e12
    found = problems([tiny_case(tmp_path / "stripe", t1c)])
    assert "count as brain" in found["stripe"] and "extreme values" in found["stripe"]
    # an int16 T1C whose scl_slope is -1: all brain values <= 0, so the network's input would be empty: refused
    folder = tmp_path / "slope"
    case = {"case_id": "slope", "t1c": save_scaled(folder / "t1c.nii", brain(0).astype(np.int16), slope=-1.0),
            "t2w": save(folder / "t2w.nii.gz", brain(1))}
    assert float(np.asanyarray(nib.load(case["t1c"]).dataobj).max()) <= 0
    assert "t1c: no T1C voxel is above 0" in problems([case])["slope"]
    # T1C and T2W the same image: refused
    same = tiny_case(tmp_path / "same", brain(0), brain(0))
    assert "t2w: the same image as the T1C" in problems([same])["same"]
    # a float64 value beyond float32 (the loader's type) counts as infinite
    t1c = brain(0).astype(np.float64)
    t1c[10, 10, 10] = 1e39
    assert "NaN or Inf voxels (after scaling to float32)" in problems([tiny_case(tmp_path / "f64", t1c)])["f64"]


# -- item 3: the background's sign ---------------------------------------------------------------------------------

def test_item3_negative_background_gives_the_clean_input(tmp_path):
    reference = network_input(tiny_case(tmp_path / "clean"))
    shifted = tiny_case(tmp_path / "minus1000", brain(0) - 1000, brain(1) - 1000)
    seen = network_input(shifted)
    assert torch.equal(seen != 0, reference != 0)  # the same brain mask (the crop and the z-score agree)
    assert torch.allclose(seen, reference, atol=1e-4)
    assert not problems([shifted])
    old = network_input(shifted, chain_of_bundle050(**TINY_CHAIN))  # 0.5.0: |T1C| took the background as brain
    assert not torch.equal(old != 0, reference != 0)


# -- item 4: one geometry for the check, the loader and the writer -----------------------------------------------

def test_item4_pixdim_sform_conflict_uses_one_geometry_and_messages_print_the_real_numbers(tmp_path, caplog):
    # pixdim 6 x 6 x 7.5 over a 6 mm sform; pixdim 0 (unset) over a 6 mm sform. MONAI's own reader would take
    # 7.5 mm (the qform) and 1 mm; the check, the loader and the writer all take the sform, and a warning says so
    for name, zooms in (("conflict", (6.0, 6.0, 7.5)), ("zero", (0.0, 0.0, 0.0))):
        img = nib.Nifti1Image(brain(0), AFFINE)
        img.header["pixdim"][1:4] = zooms
        folder = tmp_path / "in" / name
        folder.mkdir(parents=True)
        nib.save(img, str(folder / f"{name}_t1ce.nii.gz"))
        case = {"case_id": name, "t1c": str(folder / f"{name}_t1ce.nii.gz"),
                "t2w": save(folder / f"{name}_t2.nii.gz", brain(1))}
        assert not problems([case])
        assert "disagrees with its sform voxels 6 x 6 x 6 mm; the sform is used" in caplog.text
        loaded = Compose(preprocessing_transforms(**TINY_CHAIN)[:2])({"t1c": case["t1c"]})["t1c"]
        assert np.allclose(loaded.affine.numpy(), AFFINE)
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out")).run()
    for name in ("conflict", "zero"):  # the mask lies on the T1C's 6 mm grid, not on 7.5 mm or 1 mm slices
        mask = nib.load(str(tmp_path / "out" / f"{name}_seg.nii.gz"))
        assert mask.shape == (32, 32, 32) and np.allclose(mask.affine, AFFINE)
    # a 0.5 x 0.5 x 10 mm whole-brain scan (15 slices) passes; a small one is refused naming its real extent
    thick = np.diag([0.5, 0.5, 10.0, 1.0])
    vol = np.zeros((160, 160, 15), np.float32)
    vol[20:140, 20:140, 2:13] = np.random.default_rng(0).uniform(100, 1000, (120, 120, 11))
    case = {"case_id": "thick", "t1c": save(tmp_path / "thick" / "t1c.nii.gz", vol, thick),
            "t2w": save(tmp_path / "thick" / "t2w.nii.gz", vol[::-1].copy(), thick)}
    assert not problems([case])
    small = np.diag([1.5, 1.5, 1.5, 1.0])
    case = {"case_id": "small", "t1c": save(tmp_path / "small" / "t1c.nii.gz", brain(0), small),
            "t2w": save(tmp_path / "small" / "t2w.nii.gz", brain(1), small)}
    assert "too small for a brain volume: 48 mm along axis 0 (at least 64 mm); shape (32, 32, 32), field of view " \
           "48 x 48 x 48 mm" in problems([case])["small"]


# -- item 7: a whole head is refused when inference runs without brain extraction -----------------------------------

def test_item7_whole_head_with_skull_is_refused(tmp_path, brats_case):
    colin = SHARED_DATA / "colin27"
    if not (colin / "ch2.nii.gz").is_file():
        pytest.skip("shared colin27 head not available")
    head = {"case_id": "colin", "t1c": str(colin / "ch2.nii.gz"), "t2w": str(colin / "ch2.nii.gz")}
    found = skull_problem(head)
    assert found and "whole head, not a skull-stripped brain" in found and "4152 mL" in found
    assert skull_problem({"t1c": str(colin / "ch2bet.nii.gz")}) is None
    assert skull_problem(brats_case) is None
    assert skull_problem({"t1c": str(SHARED_DATA / "sri24" / "sri24_t1_brain.nii.gz")}) is None
    # in the inference check: refused with the reason; the check can be left out (brain extraction strips it first)
    t2w = tmp_path / "ch2_t2w.nii.gz"  # another image on the same grid, so that only the skull is in question
    img = nib.load(head["t1c"])
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine), str(t2w))
    head["t2w"] = str(t2w)
    assert "t1c: looks like a whole head" in problems([head])["colin"]
    assert not problems([head], check_skull=False)


# -- item 1: calibration temperatures are checked when read; strict JSON ------------------------------------------

def test_item1_calibration_temperatures_are_validated_and_reported_per_task(tmp_path):
    ckpt = checkpoint(tmp_path)
    store_calibration(ckpt, {"temperature": {"idh": 2.0}, "split": "validation"})
    tiny_case(tmp_path / "in" / "P1")
    case_dir = tmp_path / "in" / "P1"
    for key, name in (("t1c", "P1_t1ce"), ("t2w", "P1_t2")):
        (case_dir / f"{key}.nii.gz").rename(case_dir / f"{name}.nii.gz")
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out")).run()
    text = (tmp_path / "out" / "P1.json").read_text()
    result = json.loads(text)
    assert result["idh"]["calibrated"] is True and result["idh"]["temperature"] == 2.0
    assert result["grade"]["calibrated"] is False and "temperature" not in result["grade"]
    assert result["calibrated"] is False  # one task calibrated is not all three
    for bad in (-1.0, float("inf"), 0.0, float("nan"), "2", True, 1e-9, 1e6):
        store_calibration(ckpt, {"temperature": {"grade": bad}, "split": "validation"})
        with pytest.raises(CalibrationError) as err:
            read_temperatures(ckpt)
        assert str(ckpt) in str(err.value) and "'grade'" in str(err.value) and repr(bad) in str(err.value)
        # evaluation reads them through the same check: a T = -1 model's report is refused, not computed on raw logits
        with pytest.raises(CalibrationError):
            Calibration(str(ckpt)).update_report({"tasks": {"grade": {}}}, np.full((4, 1, 2), 0.5),
                                                 np.array([[0], [1], [0], [1]]), ["grade"])
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out2")),
                  CalibrationError)
    assert "calibration temperature of task 'grade'" in str(err) and str(ckpt) in str(err)
    assert not (tmp_path / "out2" / "P1.json").exists()
    # strict JSON: no NaN or Infinity anywhere, null and a reason instead
    text = strict_json({"tasks": {"grade": {"roc_auc": float("nan"), "f1": 1.0}}, "x": [float("inf")]})
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert loaded["tasks"]["grade"]["roc_auc"] is None and loaded["x"] == [None]
    assert "one class only" in loaded["null_reasons"]["tasks.grade.roc_auc"] and "x.0" in loaded["null_reasons"]


# -- item 5: outputs never inside the inputs, one run at a time, overwrite keeps what the user changed -------------

def test_item5_outputs_locked_hashed_and_never_inside_input_folders(tmp_path, capfd):
    for name, seed in (("A", 0), ("B", 2)):
        brats_like_case(tmp_path / "in", name, seed)
    # datalist mode: an output folder that is (or lies inside) a folder of the listed cases is refused
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"testing": [{"case_id": "A", "t1c": "in/A/A_t1ce.nii.gz", "t2w": "in/A/A_t2.nii.gz"}]}))
    for out in (tmp_path / "in" / "A", tmp_path / "in" / "A" / "pred"):
        err = failure(workflow(tmp_path, datalist=str(dl), output_dir=str(out)), OutputExistsError)
        assert "lies inside the input folder" in str(err) and str(tmp_path / "in" / "A") in str(err)
    assert not (tmp_path / "in" / "A" / "A.json").exists() and not (tmp_path / "in" / "A" / "pred").exists()
    # a second run into a folder that a live run holds is refused; a lock left by a dead run is taken over
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".igreg_inference.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)), TrainingLockError)
        assert f"another inference run (pid {other.pid}) is using {out}" in str(err)
    finally:
        other.kill()
        other.wait()
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)).run()
    assert "taking over the stale lock" in printed(capfd)
    assert not (out / ".igreg_inference.lock").exists() and not (out / ".igreg_incomplete").exists()
    manifest = json.loads((out / ".igreg_outputs.json").read_text())["files"]
    assert manifest["A_seg.nii.gz"] == hashlib.sha256((out / "A_seg.nii.gz").read_bytes()).hexdigest()
    # --overwrite: a mask corrected by hand at one of this run's outputs is refused, naming it, and kept
    corrected = nib.load(str(out / "A_seg.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(corrected.shape, np.uint8), corrected.affine), str(out / "A_seg.nii.gz"))
    edited = (out / "A_seg.nii.gz").read_bytes()
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out), overwrite=True),
                  OutputExistsError)
    assert "A_seg.nii.gz was changed since an inference run of this bundle wrote it" in str(err)
    assert (out / "A_seg.nii.gz").read_bytes() == edited and (out / "B.json").exists()
    # ... and elsewhere (case A no longer predicted) it is kept and named; the unchanged files of the run go
    shutil.rmtree(tmp_path / "in" / "A")
    capfd.readouterr()
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out), overwrite=True).run()
    assert (out / "A_seg.nii.gz").read_bytes() == edited and not (out / "A.json").exists()
    assert "kept 1 file(s) changed since this bundle wrote them: A_seg.nii.gz" in printed(capfd)
    assert sorted(json.loads((out / ".igreg_outputs.json").read_text())["files"]) == [
        "B.json", "B_seg.nii.gz", "predictions.csv"]
    # unique temporary names: two writes of one file never share one
    names = []
    for _ in range(2):
        atomic_write(out / "x.txt", lambda p: names.append(p.name) or p.write_text("x"))
    assert len(set(names)) == 2


def test_item5_a_run_that_dies_is_reported_and_its_files_removed_by_overwrite(tmp_path, capfd, monkeypatch):
    for name, seed in (("A", 0), ("B", 2)):
        brats_like_case(tmp_path / "in", name, seed)
    out = tmp_path / "out"

    def die(self, engine):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(PredictionWriter, "write_table", die)  # dies after every case's files were written
        with pytest.raises(Exception):
            workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)).run()
    assert (out / ".igreg_incomplete").exists()
    assert {"A.json", "A_seg.nii.gz", "B.json"} <= set(json.loads((out / ".igreg_outputs.json").read_text())["files"])
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)), OutputExistsError)
    assert "of a run that did not finish" in str(err)
    shutil.rmtree(tmp_path / "in" / "A")
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out), overwrite=True).run()
    logged = printed(capfd)
    assert "an earlier inference run into" in logged and "did not finish" in logged
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "B.json", "B_seg.nii.gz", "predictions.csv"]
    assert not (out / ".igreg_incomplete").exists()


# -- item 6: discovery says what it skips -----------------------------------------------------------------------------

def test_item6_symlinked_and_brats_named_case_folders_found_and_orphans_reported(tmp_path, caplog, capfd):
    root = tmp_path / "cases"
    brats_like_case(root, "A")
    plain = root / "P"  # plain layout with BraTS-style names
    save(plain / "t1ce.nii.gz", brain(0))
    save(plain / "t2.nii.gz", brain(1))
    brats_like_case(tmp_path / "elsewhere", "L")
    (root / "L").symlink_to(tmp_path / "elsewhere" / "L", target_is_directory=True)
    save(root / "O" / "T1C_gd.nii.gz", brain(0))  # image files that form no case
    save(root / "O" / "flair.nii.gz", brain(1))
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle is walked once
    cases = find_cases(root)
    assert [c["case_id"] for c in cases] == ["A", "L", "P"]
    assert cases[2]["t1c"].endswith("P/t1ce.nii.gz") and cases[2]["t2w"].endswith("P/t2.nii.gz")
    text = caplog.text + printed(capfd)
    assert "1 folder(s) hold NIfTI files that form no case" in text and str(root / "O") in text
    assert "T1C_gd.nii.gz" in text and "--strict true makes this an error" in text
    with pytest.raises(DatalistError, match="form no case.*/O "):
        find_cases(root, strict=True)
    with pytest.raises(DatalistError, match="form no case"):
        inference_cases(input_dir=str(root), strict=True)
    with pytest.raises(DatalistError, match="form no case"):
        build(str(root), output=str(tmp_path / "dl.json"), strict=True)
    assert [c["case_id"] for c in inference_cases(input_dir=str(root))] == ["A", "L", "P"]


# -- item 8: resume refuses another datalist and a settings record that lies ------------------------------------------

class Counter(nn.Module):
    """A stand-in strategy: one parameter, one optimizer; each iteration adds 1 to the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.optimizers = [torch.optim.SGD(self.parameters(), lr=0.1)]


def run_counter(ckpt_dir: Path, epochs: int, **state_args) -> list[int]:
    strategy, done = Counter(), []

    def step(engine: Engine, _: object) -> None:
        strategy.w.data.add_(1)
        done.append(engine.state.iteration)

    engine = Engine(step)
    engine.state.skipped_steps = engine.state.consecutive_skipped = 0
    TrainingState(strategy, None, str(ckpt_dir), save_every=1, **state_args).attach(engine)
    engine.run(range(3), max_epochs=epochs, epoch_length=3)
    return done


def test_item8_resume_with_a_changed_datalist_or_a_lying_settings_record_is_refused(tmp_path):
    training = [{"case_id": f"c{i}", "t1c": f"c{i}/t1c.nii.gz", "t2w": f"c{i}/t2w.nii.gz", "idh": i % 2}
                for i in range(3)]
    lists = {"training": training, "validation": [{"case_id": "v0", "t1c": "v/t1c.nii.gz", "t2w": "v/t2w.nii.gz"}]}
    before = datalist_fingerprint(lists, ["training", "validation"], base_dir=tmp_path)
    # c1 removed, c2 relabelled, c9 added
    lists["training"] = [training[0], {**training[2], "idh": 1}, {**training[0], "case_id": "c9"}]
    (tmp_path / "dl.json").write_text(json.dumps(lists))
    after = datalist_fingerprint(str(tmp_path / "dl.json"), ["training", "validation"])
    max_pool = {"network": {"pooling": "max"}, "pixdim": [1.0, 1.0, 1.0]}
    assert run_counter(tmp_path, 1, settings=max_pool, datalist=before) == [1, 2, 3]
    with pytest.raises(CheckpointError) as err:
        run_counter(tmp_path, 2, settings=max_pool, datalist=after)
    assert "saved with another datalist (training: 1 added ('c9'), 1 removed ('c1'), 1 changed ('c2'))" in \
        str(err.value) and "--accept_datalist_change true" in str(err.value)
    assert run_counter(tmp_path, 2, settings=max_pool, datalist=after, accept_datalist_change=True) == [4, 5, 6]
    # this run's settings differ from the state's: refused, naming the setting
    with pytest.raises(CheckpointError, match='network_def#pooling: checkpoint "max" vs this run "avg"'):
        run_counter(tmp_path, 3, settings={**max_pool, "network": {"pooling": "avg"}}, datalist=after)
    # the state's settings record edited to say "avg": it no longer matches its weights
    state = safe_load(tmp_path / "training_state.pt")
    state["settings"]["network"]["pooling"] = "avg"
    torch.save(state, tmp_path / "training_state.pt")
    with pytest.raises(CheckpointError, match="settings record does not match its weights"):
        run_counter(tmp_path, 3, settings={**max_pool, "network": {"pooling": "avg"}}, datalist=after)
    # the same for model.pt (inference, evaluation): an edited record is refused before the settings are compared
    net = Counter()
    model = with_settings(net.state_dict(), max_pool)
    check_network_weights(net, model, "model.pt", max_pool)
    model._metadata["igreg_settings"]["network"]["pooling"] = "avg"
    with pytest.raises(CheckpointError, match="settings record does not match its weights"):
        check_network_weights(net, model, "model.pt", {**max_pool, "network": {"pooling": "avg"}})


# -- item 9: one-line errors, nothing half-written left -----------------------------------------------------------

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_item9_disk_full_and_odd_labels_csv_give_one_line_errors(tmp_path, monkeypatch):
    for name, seed in (("A", 0), ("B", 2)):
        brats_like_case(tmp_path / "in", name, seed)
    out = tmp_path / "out"
    real_save = nib.save

    def save_until_b(image, path):  # the disk fills up while case B's mask is written
        if "B_seg" in str(path):
            Path(path).write_bytes(b"")
            disk_full()
        real_save(image, path)

    with monkeypatch.context() as m:
        m.setattr("scripts.inference.nib.save", save_until_b)
        err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)), InferenceError)
    line = message(bundle_error(err))
    assert "\n" not in line and "1 case(s) got no prediction: B" in line and "no space left on the device" in line
    rows = list(csv.DictReader(open(out / "prediction_errors.csv")))
    assert [r["case_id"] for r in rows] == ["B"] and f"B_seg.nii.gz in {out}" in rows[0]["problem"]
    assert " free)" in rows[0]["problem"] and "B needed" in rows[0]["problem"]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert {"A.json", "A_seg.nii.gz", "prediction_errors.csv", "predictions.csv"} <= set(
        json.loads((out / ".igreg_outputs.json").read_text())["files"])
    # nothing can be written at all (the error list neither): one line naming the folder
    with monkeypatch.context() as m:
        m.setattr("scripts.inference.write_csv", disk_full)
        m.setattr("scripts.inference.nib.save", disk_full)
        err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "o2")),
                      OutputWriteError)
    assert f"cannot write prediction_errors.csv in {tmp_path / 'o2'}: no space left on the device" in str(err)
    # the training state, model.pt and a datalist: a full disk leaves the old file and no temporary file
    (tmp_path / "ckpt").mkdir()

    def half_then_full(obj, f, **kwargs):
        f.write(b"x" * 1000)
        disk_full()

    with monkeypatch.context() as m:
        m.setattr("scripts.checkpoint.torch.save", half_then_full)
        with pytest.raises(CheckpointError, match=r"cannot write training_state.pt in .*ckpt: no space left on the "
                                                  r"device \(about 1.0 kB needed"):
            atomic_save({"a": torch.zeros(1)}, tmp_path / "ckpt" / "training_state.pt")
        with pytest.raises(CheckpointError, match="cannot write model.pt in .*: no space left on the device"):
            SharedDiskSaver(tmp_path / "ckpt")({"a": torch.zeros(1)}, "model.pt")
    assert list((tmp_path / "ckpt").iterdir()) == []
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", lambda self, *a, **k: (open(self, "w").write("{\"train"), disk_full()))
        with pytest.raises(DatalistFileError, match="cannot write the datalist .*dl.json in .*: No space left"):
            write_datalist(tmp_path / "lists" / "dl.json", {"training": []})
    assert list((tmp_path / "lists").iterdir()) == []
    # labels CSV: ';' separator, UTF-16 (Excel's "Unicode text"), '1p/19q' and 'Case ID' columns are read
    for name, text, encoding in (("semi.csv", "case_id;IDH;grade\nP1;1;0\n", "utf-8"),
                                 ("utf16.csv", "Case ID\t1p/19q\tidh\nP1\t0\t1\n", "utf-16")):
        (tmp_path / name).write_text(text, encoding=encoding)
        assert read_labels(str(tmp_path / name))["P1"] in ({"idh": 1, "grade": 0}, {"1p19q": 0, "idh": 1})
    (tmp_path / "noid.csv").write_text("patient,idh\nP1,1\n")
    with pytest.raises(DatalistError) as err:
        read_labels(str(tmp_path / "noid.csv"))
    assert "noid.csv: the labels CSV needs a 'case_id' column, has ['patient', 'idh']" in message(err.value)
    assert bundle_error(err.value) is err.value


# -- item 10: the weak ones -----------------------------------------------------------------------------------------

def test_item10_weak_cases_are_said(tmp_path, caplog):
    # case_id "" is warned about and named by its stand-in; 0 is the id "0"
    with caplog.at_level("WARNING"):
        cases = load_datalist({"testing": [{"case_id": "", "t1c": "a/t1c.nii.gz", "t2w": "a/t2w.nii.gz"},
                                           {"case_id": 0, "t1c": "b/t1c.nii.gz", "t2w": "b/t2w.nii.gz"}]},
                              "testing", tmp_path)
    assert [c["case_id"] for c in cases] == ["a/t1c", "0"]
    assert "case #0 has an empty case_id (''); it is called 'a/t1c' instead" in caplog.text
    # a test split where a task has one class: the macro scores are those of the classes that occur, AUC null + why
    report = classification_report(np.zeros(4, int), np.array([[0.9, 0.1]] * 4))
    assert report["macro_f1"] == 1.0 and "one class only" in report["note"]
    written = json.loads(strict_json({"tasks": {"grade": report}}))
    assert written["tasks"]["grade"]["roc_auc"] is None and "one class only" in \
        written["null_reasons"]["tasks.grade.roc_auc"]
    two = classification_report(np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]))
    assert two["macro_f1"] == pytest.approx(0.7333333) and "note" not in two  # both classes: unchanged
    # a mask that is not a label map (a probability map) is read as tumor wherever > 0, and a warning says so
    folder = tmp_path / "prob"
    mask = np.zeros((32, 32, 32), np.float32)
    mask[10:14, 10:14, 10:14] = 0.3
    case = {**tiny_case(folder), "seg": save(folder / "seg.nii.gz", mask)}
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_case(case, tasks=())
    assert "the mask holds values that are not label numbers (e.g. 0.3" in caplog.text
    caplog.clear()
    brats = {**case, "seg": save(folder / "brats_seg.nii.gz", (mask > 0) * np.uint8(4))}  # labels 0/4: no warning
    with caplog.at_level("WARNING"):
        check_case(brats, tasks=())
    assert "not label numbers" not in caplog.text
    # a 1p/19q column is read as the task (names compared without punctuation); an unknown one is named
    (tmp_path / "labels.csv").write_text("case_id,1p/19q,IDH status\nP1,1,1\n")
    with caplog.at_level("WARNING"):
        assert read_labels(str(tmp_path / "labels.csv")) == {"P1": {"1p19q": 1}}
    assert "['IDH status'] are not task labels" in caplog.text
