"""prepare_datalist and the datalist check against hostile inputs (issue item 8)."""
import json

import pytest
from test_data_validate import _case_folders, _save, good_case  # noqa: F401 (fixture)

from scripts.data import DatalistError, validate_datalist
from scripts.data.datalist import DatalistFileError
from scripts.prepare_datalist import build, main, read_labels, report


def test_defect8_labels_csv_from_excel_with_other_column_case(tmp_path):
    _case_folders(tmp_path / "cases")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes("\ufeffCase_ID,IDH,Grade,1P19Q,notes\np2,1,0,,x\np3,0,1,0,\np3,0,1,0,\n".encode("utf-8"))
    assert read_labels(str(csv_path)) == {"p2": {"idh": 1, "grade": 0}, "p3": {"idh": 0, "grade": 1, "1p19q": 0}}
    out = build(str(tmp_path / "cases"), str(csv_path), str(tmp_path / "dl.json"))
    cases = {c["case_id"]: c for s in ("training", "validation", "testing")
             for c in json.loads(open(out).read())[s]}
    assert cases["p2"]["idh"] == 1 and cases["p3"]["1p19q"] == 0
    csv_path.write_text("case_id,idh\np2,1\np2,0\n")              # conflicting duplicate rows
    with pytest.raises(DatalistError, match="case 'p2', field 'case_id': listed twice .* different labels"):
        read_labels(str(csv_path))


def test_defect8_output_never_replaces_an_input_or_an_existing_file(tmp_path):
    _case_folders(tmp_path / "cases")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("case_id,idh\np2,1\n")
    before = csv_path.read_bytes()
    with pytest.raises(FileExistsError, match="is an input file"):
        build(str(tmp_path / "cases"), str(csv_path), str(csv_path), overwrite=True)
    assert csv_path.read_bytes() == before
    with pytest.raises(FileExistsError, match="is an input file"):
        build(str(tmp_path / "cases"), None, str(tmp_path / "cases" / "p2" / "t1c.nii"), overwrite=True)
    out = tmp_path / "dl.json"
    out.write_text("{}")
    with pytest.raises(FileExistsError, match="exists; choose another name or add --overwrite"):
        build(str(tmp_path / "cases"), str(csv_path), str(out))
    assert out.read_text() == "{}"
    build(str(tmp_path / "cases"), str(csv_path), str(out), overwrite=True)
    assert "training" in json.loads(out.read_text())


def test_defect8_datalist_check_reports_every_problem(tmp_path, good_case, capsys):  # noqa: F811
    leak = {**good_case, "case_id": "c1-copy"}                          # same images under another id
    hinted = {**good_case, "case_id": "c2", "label": good_case["seg"], "IDH": 1}
    bad = {"case_id": "c3", "t1c": "missing.nii.gz", "t2w": "missing_t2w.nii.gz"}
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [good_case, bad], "validation": [leak], "testing": [hinted]}))
    with pytest.raises(DatalistError, match="validation case 'c1-copy', field 't1c': .* also the image of case 'c1'"):
        validate_datalist({"training": [good_case], "validation": [leak]}, base_dir=tmp_path)
    result = report(str(dl))
    problems = {(e["case"], e["field"]) for e in result["errors"]}
    assert problems == {("c3", "t1c"), ("c1-copy", "t1c"), ("c2", "t1c")}
    assert any("unknown key 'label'" in w and "did you mean 'seg'?" in w for w in result["warnings"])
    assert any("unknown key 'IDH'" in w and "did you mean 'idh'?" in w for w in result["warnings"])
    with pytest.raises(SystemExit, match="3 problem"):
        main(check=str(dl))
    assert '"ok": false' in capsys.readouterr().out
    dl.write_text("{}")
    with pytest.raises(DatalistError, match=f"datalist {dl} has no cases"):
        validate_datalist(str(dl))
    dl.write_text("training: [a, b]\n")
    with pytest.raises(DatalistFileError, match=f"datalist {dl} is not valid JSON"):
        validate_datalist(str(dl))
    dl.write_text(json.dumps({"validation": [good_case]}))
    with pytest.raises(DatalistError, match="has no training cases"):
        validate_datalist(str(dl), splits=["training", "validation"])
