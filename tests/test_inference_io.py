"""Finding cases to predict and keeping inference from overwriting inputs or earlier results."""
import json

import pytest

from scripts.data import DatalistError, find_cases
from scripts.inference import OutputExistsError, inference_cases, output_name, prepare_output_dir


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_cases_brats_flat_and_plain_layouts(tmp_path):
    _touch(tmp_path / "A" / "A_t1ce.nii.gz")
    _touch(tmp_path / "A" / "A_t2.nii.gz")
    _touch(tmp_path / "A" / "A_seg.nii.gz")
    _touch(tmp_path / "B_t1c.nii")
    _touch(tmp_path / "B_t2w.nii")
    _touch(tmp_path / "C" / "t1c.nii.gz")
    _touch(tmp_path / "C" / "t2w.nii")
    _touch(tmp_path / "notes" / "readme.nii.gz")  # no layout: ignored
    cases = find_cases(tmp_path)
    assert [c["case_id"] for c in cases] == ["A", "B", "C"]
    assert cases[0]["seg"].endswith("A_seg.nii.gz") and "seg" not in cases[1]
    assert cases[1]["t2w"].endswith("B_t2w.nii") and cases[2]["t2w"].endswith("C/t2w.nii")
    inputs = inference_cases(input_dir=str(tmp_path))
    assert [sorted(c) for c in inputs] == [["case_id", "t1c", "t2w"]] * 3  # inference never reads a mask


def test_find_cases_names_missing_t2_and_duplicates(tmp_path):
    _touch(tmp_path / "C_t1ce.nii.gz")
    with pytest.raises(DatalistError, match="case 'C', field 't2w'"):
        find_cases(tmp_path)
    _touch(tmp_path / "C_t2.nii.gz")
    _touch(tmp_path / "C" / "t1c.nii.gz")
    _touch(tmp_path / "C" / "t2w.nii.gz")
    with pytest.raises(DatalistError, match="case 'C', field 'case_id': found twice"):
        find_cases(tmp_path)


def test_datalist_cases_get_ids(tmp_path):
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"testing": [{"t1c": "x/P7_t1ce.nii.gz", "t2w": "x/P7_t2.nii.gz"}]}))
    cases = inference_cases(datalist=str(dl))
    assert cases[0]["case_id"] == "x/P7_t1ce" and cases[0]["t1c"] == str(tmp_path / "x" / "P7_t1ce.nii.gz")
    assert output_name(cases[0]) == "x%2FP7_t1ce"  # one folder for all outputs; "/" encoded, not confused with "_"


def test_output_dir_refusals(tmp_path):
    inputs = tmp_path / "in"
    # the mask of case P1 is written as `P1_seg.nii.gz`, which is this case's second input here
    case = {"case_id": "P1", "t1c": str(_touch(inputs / "P1.nii.gz")), "t2w": str(_touch(inputs / "P1_seg.nii.gz"))}
    with pytest.raises(OutputExistsError, match="case 'P1': output .* would overwrite an input"):
        prepare_output_dir(str(inputs), [case])
    out = tmp_path / "out"
    prepare_output_dir(str(out), [case])
    (out / "predictions.csv").write_text("case_id\n")
    with pytest.raises(OutputExistsError, match="earlier run"):
        prepare_output_dir(str(out), [case])
    assert prepare_output_dir(str(out), [case], overwrite=True) == str(out.resolve())


def test_defect2_too_long_output_names_are_refused_before_writing(tmp_path):
    case = {"case_id": "x" * 250, "t1c": str(_touch(tmp_path / "in" / "a.nii.gz")), "t2w": "b.nii.gz"}
    with pytest.raises(OutputExistsError, match="longer than 255 bytes"):
        prepare_output_dir(str(tmp_path / "out"), [case])
    assert not (tmp_path / "out").exists()
