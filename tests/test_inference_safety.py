"""Inference against hostile inputs: ground truth never overwritten, one output name per case id,
bad cases reported (not predicted) and the run failing naming them (issue items 1, 2 and 3)."""
import csv
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE
from monai.bundle import ConfigWorkflow

from scripts.checkpoint import CheckpointError, with_settings
from scripts.data import DatalistError
from scripts.inference import CaseCheck, InferenceError, OutputExistsError, PredictionWriter, output_name

CONFIGS = [str(BUNDLE / "configs" / f"{n}.yaml") for n in ("inference", "demo")]
TINY = {  # a 32^3 world at 8 mm with the narrowest network
    "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32], "num_workers": 0,
    "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16], "network_def#cardinality": 2,
    "network_def#depths": [1, 1, 1, 1],
}
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def brain(seed: int = 0, shape=(24, 24, 24)) -> np.ndarray:
    vol = np.zeros(shape, np.float32)
    vol[4:20, 4:20, 4:20] = np.random.default_rng(seed).uniform(100, 1000, (16, 16, 16))
    return vol


def seg() -> np.ndarray:
    mask = np.zeros((24, 24, 24), np.uint8)
    mask[8:12, 8:12, 8:12] = 1
    return mask


def brats_case(root: Path, name: str, seed: int = 0) -> Path:
    """`<root>/<name>/<name>_{t1ce,t2,seg}.nii.gz`; returns the case folder."""
    folder = root / name
    save(folder / f"{name}_t1ce.nii.gz", brain(seed))
    save(folder / f"{name}_t2.nii.gz", brain(seed + 1))
    save(folder / f"{name}_seg.nii.gz", seg())
    return folder


def workflow(tmp_path: Path, initialize: bool = True, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="infer", bundle_root=str(BUNDLE),
                        **{**TINY, "ckpt_path": str(checkpoint(tmp_path)), **overrides})
    if initialize:
        wf.initialize()
    return wf


def checkpoint(tmp_path: Path, nan: bool = False) -> Path:
    """The model.pt of an untrained tiny network as training writes it."""
    path = tmp_path / ("nan_model.pt" if nan else "model.pt")
    if not path.exists():
        wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="infer", bundle_root=str(BUNDLE), load_pretrain=False,
                            **TINY)
        wf.initialize()
        torch.manual_seed(0)
        net = wf.parser.get_parsed_content("network_def")
        if nan:
            with torch.no_grad():
                next(net.parameters()).view(-1)[0] = float("nan")
        torch.save(with_settings(net.state_dict(), wf.parser.get_parsed_content("model_settings")), path)
    return path


def failure(wf: ConfigWorkflow, kind: type) -> BaseException:
    """Run `wf` (initialize first when it is not yet: the checkpoint loads there), expect it to fail,
    return the `kind` exception of the chain."""
    with pytest.raises(Exception) as err:
        if not wf._is_initialized:
            wf.initialize()
        wf.run()
    e: BaseException | None = err.value
    while e is not None and not isinstance(e, kind):
        e = e.__cause__ or e.__context__
    assert e is not None, f"no {kind.__name__} in {err.value!r}"
    return e


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_defect1_inference_never_overwrites_ground_truth(tmp_path):
    case = brats_case(tmp_path / "in", "P1")
    before = snapshot(tmp_path / "in")
    # output_dir = the case folder: P1_seg.nii.gz would be the ground-truth mask
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(case)), OutputExistsError)
    assert "would overwrite an input file" in str(err) and "P1_seg.nii.gz" in str(err)
    assert snapshot(tmp_path / "in") == before
    # the same with a datalist naming the mask in its training list and the images in testing
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"case_id": "P1", "t1c": "in/P1/P1_t1ce.nii.gz", "t2w": "in/P1/P1_t2.nii.gz",
                                            "seg": "in/P1/P1_seg.nii.gz", "idh": 1}],
                              "testing": [{"case_id": "P1", "t1c": "in/P1/P1_t1ce.nii.gz",
                                           "t2w": "in/P1/P1_t2.nii.gz"}]}))
    err = failure(workflow(tmp_path, datalist=str(dl), output_dir=str(case), overwrite=True), OutputExistsError)
    assert "P1_seg.nii.gz" in str(err)
    assert snapshot(tmp_path / "in") == before
    # the datalist itself is an input too: a case named `dl` would write dl.json
    dl2 = tmp_path / "dl2.json"
    dl2.write_text(json.dumps({"testing": [{"case_id": "dl2", "t1c": "in/P1/P1_t1ce.nii.gz",
                                            "t2w": "in/P1/P1_t2.nii.gz"}]}))
    err = failure(workflow(tmp_path, datalist=str(dl2), output_dir=str(tmp_path), overwrite=True), OutputExistsError)
    assert "dl2.json would overwrite an input file" in str(err)
    # an output folder inside input_dir is refused even where no mask exists yet: its masks would pose as ground truth
    (case / "P1_seg.nii.gz").rename(tmp_path / "P1_seg.nii.gz")
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "in" / "pred")),
                  OutputExistsError)
    assert "lies inside input_dir" in str(err) and not (tmp_path / "in" / "pred").exists()
    (tmp_path / "P1_seg.nii.gz").rename(case / "P1_seg.nii.gz")
    # elsewhere it works, and the inputs are untouched
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out")).run()
    assert (tmp_path / "out" / "P1_seg.nii.gz").is_file() and snapshot(tmp_path / "in") == before


def test_defect2_similar_case_ids_get_distinct_outputs_and_duplicates_are_refused(tmp_path):
    assert output_name("sub01.ses1") == "sub01.ses1" and output_name("site/P1") == "site%2FP1"
    assert output_name("site_P1") == "site_P1" and output_name("a%2Fb") == "a%252Fb"
    assert output_name("../x") == "%2E.%2Fx" and output_name("") == "%00"
    ids = ["sub01.ses1", "sub01.ses2", "site/P1", "site_P1"]
    for i in range(2):
        save(tmp_path / f"c{i}" / "t1c.nii.gz", brain(i))
        save(tmp_path / f"c{i}" / "t2w.nii.gz", brain(i + 5))
    testing = [{"case_id": c, "t1c": f"c{i % 2}/t1c.nii.gz", "t2w": f"c{i % 2}/t2w.nii.gz"} for i, c in enumerate(ids)]
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"testing": testing}))
    out = tmp_path / "out"
    workflow(tmp_path, datalist=str(dl), output_dir=str(out)).run()
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted(["predictions.csv", *[f"{output_name(c)}.json" for c in ids],
                            *[f"{output_name(c)}_seg.nii.gz" for c in ids]])
    assert [json.loads((out / f"{output_name(c)}.json").read_text())["case_id"] for c in ids] == ids
    # duplicate ids (or ids equal but for letter case) are refused before anything is written
    for dup in ("sub01.ses1", "SUB01.ses1"):
        dl.write_text(json.dumps({"testing": [*testing, {**testing[1], "case_id": dup}]}))
        err = failure(workflow(tmp_path, datalist=str(dl), output_dir=str(tmp_path / "dup")), OutputExistsError)
        assert "'sub01.ses1'" in str(err) and "same output files" in str(err)
        assert not (tmp_path / "dup").exists()


def bad_cohort(root: Path) -> dict[str, str]:
    """One good BraTS case and one case per kind of bad input; returns the bad ids -> expected text."""
    brats_case(root, "good")
    bad = {}

    def case(name: str, t1c: np.ndarray | None = None, t2w_affine: np.ndarray = AFFINE, text: str = "") -> Path:
        folder = root / name
        save(folder / f"{name}_t1ce.nii.gz", brain(3) if t1c is None else t1c)
        save(folder / f"{name}_t2.nii.gz", brain(4), t2w_affine)
        bad[name] = text
        return folder

    nan = brain(3)
    nan[10, 10, 10] = np.nan
    case("nan", nan, text="NaN or Inf")
    case("zero", np.zeros((24, 24, 24), np.float32), text="all-zero")
    case("tiny", brain(3)[:8, :8, :8] + 1, text="too small")
    far = AFFINE.copy()
    far[:3, 3] = 1000.0
    case("far", t2w_affine=far, text="field of view covers only 0%")
    case("fourd", np.stack([brain(3)] * 2, -1), text="3D")
    folder = case("trunc", text="unreadable")
    data = (folder / "trunc_t1ce.nii.gz").read_bytes()
    (folder / "trunc_t1ce.nii.gz").write_bytes(gzip.compress(gzip.decompress(data))[: len(data) // 2])
    return bad


def test_defect3_bad_cases_get_no_prediction_and_the_run_fails_naming_them(tmp_path):
    bad = bad_cohort(tmp_path / "in")
    out = tmp_path / "out"
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)), InferenceError)
    assert f"{len(bad)} case(s) got no prediction" in str(err) and "1 case(s) predicted" in str(err)
    assert all(name in str(err) for name in bad)
    assert (out / "good.json").is_file() and (out / "good_seg.nii.gz").is_file()
    assert not any((out / f"{name}.json").exists() or (out / f"{name}_seg.nii.gz").exists() for name in bad)
    rows = {r["case_id"]: r for r in csv.DictReader(open(out / "prediction_errors.csv"))}
    assert set(rows) == set(bad)
    for name, text in bad.items():
        assert text in rows[name]["problem"] and rows[name]["file"].startswith(str(tmp_path / "in" / name)), name
    assert [r["case_id"] for r in csv.DictReader(open(out / "predictions.csv"))] == ["good"]
    # probabilities are finite numbers in [0, 1]
    probs = json.loads((out / "good.json").read_text())
    assert all(np.isfinite(probs[t]["probabilities"]).all() for t in ("1p19q", "idh", "grade"))


def test_defect3_missing_t2w_empty_lists_and_no_cases_are_errors(tmp_path):
    save(tmp_path / "c" / "t1c.nii.gz", brain(0))
    save(tmp_path / "c" / "t2w.nii.gz", brain(1))
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"testing": [{"case_id": "a", "t1c": "c/t1c.nii.gz"},
                                          {"case_id": "b", "t1c": "c/t1c.nii.gz", "t2w": "c/t2w.nii.gz"}]}))
    err = failure(workflow(tmp_path, datalist=str(dl), output_dir=str(tmp_path / "o1")), InferenceError)
    assert "case 'a', field 't2w': missing" in str(err) and (tmp_path / "o1" / "b.json").is_file()
    dl.write_text(json.dumps({"testing": []}))
    err = failure(workflow(tmp_path, datalist=str(dl), output_dir=str(tmp_path / "o2")), DatalistError)
    assert f"datalist {dl} has no 'testing' cases" in str(err)
    (tmp_path / "empty").mkdir()
    err = failure(workflow(tmp_path, input_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "o3")),
                  DatalistError)
    assert f"no case found under {tmp_path / 'empty'}: looked for <case>{{_t1ce|_t1c}}" in str(err)


def test_defect3_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    brats_case(tmp_path / "in", "P1")
    wf = workflow(tmp_path, initialize=False, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                  ckpt_path=str(checkpoint(tmp_path, nan=True)))
    err = failure(wf, CheckpointError)
    assert "NaN or infinite weights" in str(err)
    assert not (tmp_path / "out" / "P1.json").exists()


def test_overwrite_leaves_only_this_runs_files(tmp_path):
    brats_case(tmp_path / "in", "A")
    brats_case(tmp_path / "in", "B", seed=2)
    out = tmp_path / "out"
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out)).run()
    assert (out / "B.json").is_file()
    (out / "notes.txt").write_text("mine")                      # not written by the bundle: kept
    for f in ("B_t1ce.nii.gz", "B_t2.nii.gz", "B_seg.nii.gz"):
        (tmp_path / "in" / "B" / f).unlink()
    workflow(tmp_path, input_dir=str(tmp_path / "in"), output_dir=str(out), overwrite="true").run()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "A.json", "A_seg.nii.gz", "notes.txt", "predictions.csv"]


def test_defect5_model_carries_its_settings_and_other_settings_are_refused(tmp_path, capfd):
    path = checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)                  # plain data only
    settings = state._metadata["igreg_settings"]
    assert settings["network"]["pooling"] == "max" and settings["pixdim"] == [8.0, 8.0, 8.0]
    assert settings["spatial_size"] == [32, 32, 32] and settings["channels"] == ["t1c", "t2w"]
    assert settings["tasks"] == ["1p19q", "idh", "grade"] and settings["class_names"]["idh"] == ["wildtype", "mutant"]
    assert json.loads(json.dumps(settings)) == settings
    brats_case(tmp_path / "in", "P1")
    run = {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out")}
    err = failure(workflow(tmp_path, False, **run, **{"network_def#pooling": "avg"}), CheckpointError)
    assert 'network_def#pooling: checkpoint "max" vs this run "avg"' in str(err)
    err = failure(workflow(tmp_path, False, **run, pixdim=[4.0, 4.0, 4.0],
                           class_names={"1p19q": ["a", "b"], "idh": ["wildtype", "mutant"], "grade": ["LGG", "HGG"]}),
                  CheckpointError)
    assert "pixdim: checkpoint [8.0, 8.0, 8.0] vs this run [4.0, 4.0, 4.0]" in str(err) and "class_names" in str(err)
    assert not (tmp_path / "out" / "P1.json").exists()
    # a file of an older bundle (no settings) still loads, with a warning
    old = tmp_path / "old.pt"
    torch.save(dict(state), old)
    workflow(tmp_path, **run, ckpt_path=str(old)).run()
    assert (tmp_path / "out" / "P1.json").is_file() and "records no settings" in "".join(capfd.readouterr())


def test_defect3_non_finite_probabilities_are_never_written(tmp_path):
    check = CaseCheck([])
    writer = PredictionWriter(str(tmp_path), ["idh"], errors=check)
    state = SimpleNamespace(batch=[{"case_id": "x"}, {"case_id": "y"}],
                            output=[{"probs": {"idh": torch.tensor([float("nan"), 0.5])}, "pred": None},
                                    {"probs": {"idh": torch.tensor([0.25, 0.75])}, "pred": None}])
    writer.write_cases(SimpleNamespace(state=state))
    assert not (tmp_path / "x.json").exists() and json.loads((tmp_path / "y.json").read_text())["idh"]["class"] == 1
    assert [(e["case_id"], e["field"]) for e in check.errors] == [("x", "prediction")]
    assert "probabilities not finite for idh" in check.errors[0]["problem"]
