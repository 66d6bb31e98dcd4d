"""Calibration: the ECE and its bins, temperature fitting, storing temperatures in model.pt, and the
evaluation (`--calibrate true`) and inference workflows that write and use them."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import BUNDLE, TINY_NET
from monai.bundle import ConfigWorkflow

from scripts.calibration import (
    CalibrationError,
    apply_temperature,
    check_calibrate,
    fit_temperature,
    fit_temperatures,
    nll,
    read_calibration,
    read_temperatures,
    reliability,
    store_calibration,
)
from scripts.checkpoint import CheckedCheckpointLoader, atomic_save, checkpoint_settings, safe_load, with_settings
from scripts.data import generate_cohort
from scripts.inference import SplitPredictiond
from scripts.networks import IGRegNet

CONFIGS = BUNDLE / "configs"
TINY = {  # test_bundle.py's 32^3 world at 8 mm with the narrowest network
    "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32], "num_workers": 0, "cache": "none",
    "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16], "network_def#cardinality": 2,
    "network_def#depths": [1, 1, 1, 1],
}
TASKS = ["1p19q", "idh", "grade"]


def test_ece_and_bins_match_a_hand_computed_example():
    probs = np.array([[0.45, 0.55], [0.65, 0.35], [0.05, 0.95], [0.95, 0.05], [0.15, 0.85], [0.5, 0.5]])
    labels = np.array([1, 1, 1, 0, 0, -1])  # the last case has no label: left out
    # confidences .55 (right), .65 (wrong), .95 (right), .95 (right), .85 (wrong) in bins 5, 6, 9, 9, 8:
    # ECE = (|1 - .55| + |0 - .65| + |0 - .85| + 2 * |1 - .95|) / 5 = 2.05 / 5
    out = reliability(probs, labels, bins=10)
    assert out["ece"] == pytest.approx(0.41) and out["n"] == 5
    assert [b["count"] for b in out["bins"]] == [0, 0, 0, 0, 0, 1, 1, 0, 1, 2]
    assert out["bins"][9] == {"lower": 0.9, "upper": 1.0, "count": 2, "confidence": pytest.approx(0.95),
                              "accuracy": 1.0}
    assert out["bins"][0]["accuracy"] is None
    # two bins: all five in [0.5, 1], accuracy 3/5 against mean confidence 3.95/5
    assert reliability(probs, labels, bins=2)["ece"] == pytest.approx(abs(3 / 5 - 3.95 / 5))


def test_temperature_fit_recovers_a_known_temperature_and_lowers_nll():
    gen = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(6000, 3, generator=gen)  # a calibrated model's logits
    y = torch.multinomial(z.softmax(1), 1, generator=gen)[:, 0]
    over = 3 * z  # the same model, over-confident by T = 3
    t = fit_temperature(over, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(over, y, t) < nll(over, y) - 0.05
    # from probabilities (log p = logits up to a constant per case), one task with missing labels
    probs = np.stack([over.softmax(1).numpy(), (over / 3).softmax(1).numpy()], 1).astype(np.float32)
    labels = torch.stack([y, y], 1).numpy()
    labels[::4, 0] = -1
    temps, skipped = fit_temperatures(probs, labels, ["over", "calibrated"])
    assert temps["over"] == pytest.approx(3.0, rel=0.05) and temps["calibrated"] == pytest.approx(1.0, rel=0.05)
    assert skipped == {}
    ece_before = reliability(probs[:, 0], labels[:, 0])["ece"]
    ece_after = reliability(apply_temperature(probs[:, 0], temps["over"]), labels[:, 0])["ece"]
    assert ece_after < ece_before / 2


def test_tasks_with_one_class_or_too_few_cases_get_no_temperature():
    probs = np.full((12, 3, 2), 0.5, dtype=np.float32)
    labels = np.zeros((12, 3), dtype=int)
    labels[:6, 0] = 1  # task a: both classes
    labels[:, 2] = -1  # task c: 3 labelled cases
    labels[:3, 2] = [0, 1, 0]
    temps, skipped = fit_temperatures(probs, labels, ["a", "b", "c"], min_cases=10)
    assert set(temps) == {"a"}
    assert skipped == {"b": "one class only among its 12 labelled cases",
                       "c": "3 labelled cases (at least 10 needed)"}


def test_calibrate_is_refused_off_the_validation_split_or_without_a_checkpoint():
    with pytest.raises(CalibrationError, match="not on val_split 'testing': fitting on the test split would leak"):
        check_calibrate(True, "testing", "model.pt")
    with pytest.raises(CalibrationError, match="not on val_split 'training'"):
        check_calibrate(True, "training", "model.pt")
    with pytest.raises(CalibrationError, match="needs the checkpoint"):
        check_calibrate(True, "validation", None)
    check_calibrate(True, "validation", "model.pt")
    check_calibrate(False, "testing", None)


def test_split_predictiond_divides_logits_by_the_temperature():
    logits = {"idh": torch.tensor([2.0, -1.0]), "grade": torch.tensor([0.5, 1.5]), "seg": torch.zeros(2, 4, 4, 4)}
    raw = SplitPredictiond(keys="pred")({"pred": dict(logits)})
    cal = SplitPredictiond(keys="pred", temperatures={"idh": 2.5})({"pred": dict(logits)})
    torch.testing.assert_close(cal["probs"]["idh"], (logits["idh"] / 2.5).softmax(-1))
    torch.testing.assert_close(cal["probs"]["grade"], raw["probs"]["grade"])  # no temperature: raw
    assert cal["temperature"] == {"idh": 2.5} and "temperature" not in raw


def _tiny_checkpoint(path, settings=None):
    torch.manual_seed(0)
    net = IGRegNet(in_channels=2, tasks=TASKS, num_classes=2, **TINY_NET)
    atomic_save(with_settings(net.state_dict(), settings), path)
    return net


def test_stored_calibration_keeps_weights_settings_and_strict_loading(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    settings = {"tasks": TASKS, "pixdim": [8.0, 8.0, 8.0]}
    net = _tiny_checkpoint(path, settings)
    before = safe_load(path)
    assert read_temperatures(path) is None and read_temperatures(None) is None
    store_calibration(path, {"temperature": {"idh": 2.0}, "split": "validation"})
    after = safe_load(path)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert checkpoint_settings(after) == settings
    assert read_temperatures(path) == {"idh": 2.0} and read_calibration(path)["split"] == "validation"
    other = IGRegNet(in_channels=2, tasks=TASKS, num_classes=2, **TINY_NET)
    CheckedCheckpointLoader(path, {"model": other}, settings=settings)()  # strict, with the settings check
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))
    data = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("scripts.checkpoint.torch.save", fail)
    with pytest.raises(OSError, match="disk full"):
        store_calibration(path, {"temperature": {"idh": 9.0}})
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# ---- the workflows -------------------------------------------------------------------------------

def _configs(*names):
    return [str(CONFIGS / f"{n}.yaml") for n in names]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny cohort (8 validation cases, both classes in every task) and an untrained tiny model.pt
    with its settings record (over-confident and uninformative: the fitted temperatures are large)."""
    root = tmp_path_factory.mktemp("calibration")
    generate_cohort(root / "data", seed=0, n_train_cls=4, n_train_seg=2, n_val=8, n_test=4, spacing=8.0)
    wf = ConfigWorkflow(config_file=_configs("train", "evaluate", "demo"), workflow_type="eval", run_id="evaluating",
                        bundle_root=str(BUNDLE), load_pretrain=False, dataset_dir=str(root / "data"), **TINY)
    wf.initialize()
    net = wf.parser.get_parsed_content("network_def")
    (root / "models").mkdir()
    atomic_save(with_settings(net.state_dict(), wf.parser.get_parsed_content("model_settings")),
                root / "models" / "model.pt")
    return root


def _evaluate(root, ckpt_dir, out, split, **kw):
    wf = ConfigWorkflow(config_file=_configs("train", "evaluate", "demo"), workflow_type="eval", run_id="evaluating",
                        bundle_root=str(BUNDLE), dataset_dir=str(root / "data"), ckpt_dir=str(ckpt_dir),
                        output_dir=str(out), val_split=split, calibration_min_cases=4, **TINY, **kw)
    wf.initialize()
    wf.run()
    return json.loads((out / "metrics.json").read_text())


def _infer(root, ckpt_dir, out):
    wf = ConfigWorkflow(config_file=_configs("inference", "demo"), workflow_type="infer", bundle_root=str(BUNDLE),
                        dataset_dir=str(root / "data"), ckpt_dir=str(ckpt_dir), output_dir=str(out), **TINY)
    wf.initialize()  # loads model.pt strictly, with the settings check
    wf.run()
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if not p.name.startswith(".")}


def test_evaluation_reports_ece_bins_and_reliability_diagram(model, tmp_path):
    report = _evaluate(model, model / "models", tmp_path / "eval", "testing")
    for task in TASKS:
        r = report["tasks"][task]
        assert {"accuracy", "macro_f1", "roc_auc", "confusion_matrix", "n"} <= set(r)  # the keys already there
        assert len(r["reliability"]) == 10 and sum(b["count"] for b in r["reliability"]) == r["n"] == 4
        assert r["ece"] == pytest.approx(sum(b["count"] / r["n"] * abs(b["accuracy"] - b["confidence"])
                                             for b in r["reliability"] if b["count"]))
        assert "ece_calibrated" not in r
    assert report["calibration"]["bins"] == 10 and report["calibration"]["temperature"] == {}
    assert (tmp_path / "eval" / "reliability_diagram.png").stat().st_size > 0


def test_calibrate_on_testing_is_refused_and_the_checkpoint_kept(model, tmp_path):
    before = (model / "models" / "model.pt").read_bytes()
    with pytest.raises(Exception) as err:
        _evaluate(model, model / "models", tmp_path / "eval", "testing", calibrate="true")
    cause = err.value
    while cause is not None and not isinstance(cause, CalibrationError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and "'testing'" in str(cause) and "leak" in str(cause)
    assert (model / "models" / "model.pt").read_bytes() == before
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_calibrate_on_validation_then_infer_with_the_temperatures(model, tmp_path):
    raw_dir, cal_dir = tmp_path / "raw", tmp_path / "cal"
    raw_dir.mkdir()
    shutil.copy(model / "models" / "model.pt", raw_dir / "model.pt")
    shutil.copytree(raw_dir, cal_dir)
    weights = safe_load(raw_dir / "model.pt")
    report = _evaluate(model, cal_dir, tmp_path / "val", "validation", calibrate="true")
    cal = report["calibration"]
    temps = read_temperatures(cal_dir / "model.pt")
    assert set(temps) == set(TASKS) and temps == pytest.approx(cal["temperature"])
    assert all(0.05 <= t <= 20 for t in temps.values()) and any(t != 1 for t in temps.values())
    assert cal["fitted_on"] == "validation" and cal["skipped"] == {}
    for task in TASKS:  # in-sample, the fitted temperature lowers the NLL (T = 1 is where the fit starts)
        assert cal["nll_after"][task] < cal["nll_before"][task]
        assert report["tasks"][task]["ece_calibrated"] == cal["ece_after"][task]
    stored = read_calibration(cal_dir / "model.pt")
    assert stored["split"] == "validation" and stored["ece_before"] == pytest.approx(cal["ece_before"])
    after = safe_load(cal_dir / "model.pt")
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert checkpoint_settings(after) == checkpoint_settings(weights)

    test_report = _evaluate(model, cal_dir, tmp_path / "test", "testing")  # a calibrated model: both ECEs
    assert test_report["calibration"]["temperature"] == pytest.approx(temps)
    assert all("ece" in test_report["tasks"][t] and "ece_calibrated" in test_report["tasks"][t] for t in TASKS)

    raw, calibrated = _infer(model, raw_dir, tmp_path / "pred_raw"), _infer(model, cal_dir, tmp_path / "pred_cal")
    assert set(raw) == set(calibrated) and len(raw) == 4
    for case in raw:
        assert "calibrated" not in raw[case] and calibrated[case]["calibrated"] is True
        assert calibrated[case]["temperature"] == pytest.approx(temps)
        for task in TASKS:
            p, q = raw[case][task]["probabilities"], calibrated[case][task]["probabilities"]
            assert calibrated[case][task]["class"] == raw[case][task]["class"]
            # log-odds of the calibrated probabilities = raw log-odds / T (up to the JSON's 6 decimals)
            assert math.log(q[1] / q[0]) * temps[task] == pytest.approx(math.log(p[1] / p[0]), rel=1e-3, abs=1e-3)
