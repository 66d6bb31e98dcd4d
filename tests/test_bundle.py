"""The bundle's workflows end to end through MONAI's ConfigWorkflow, as the model zoo tests bundles:
train two iterations, evaluate, infer (demo cohort and the real BraTS case), export TorchScript."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from scripts.data import generate_cohort
from scripts.inference import OutputExistsError

CONFIGS = BUNDLE / "configs"
TINY = {  # a 32^3 world at 8 mm with the narrowest network
    "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32], "num_workers": 0, "cache": "none",
    "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16], "network_def#cardinality": 2,
    "network_def#depths": [1, 1, 1, 1],
}


def configs(*names: str) -> list[str]:
    return [str(CONFIGS / f"{n}.yaml") for n in names]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, seed=0, n_train_cls=12, n_train_seg=4, n_val=4, n_test=3, spacing=8.0)
    return root


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> dict:
    """Two training iterations of the default IGReg strategy; returns the folders it wrote."""
    run = tmp_path_factory.mktemp("run")
    dirs = {"dataset_dir": str(cohort), "output_dir": str(run / "eval"), "ckpt_dir": str(run / "models")}
    wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train", run_id="training",
                        bundle_root=str(BUNDLE), epochs=1, iters_per_epoch=2, **dirs, **TINY)
    wf.initialize()
    assert wf.check_properties() == []
    # IGReg's loader adds one batch per surrogate step (the demo takes one step)
    assert wf.parser.get_parsed_content("train#dataloader").sampler.parts == 1 + wf.parser["surrogate_steps"] == 2
    wf.run()
    wf.finalize()
    return dirs


def test_training_writes_best_model_state_and_metrics(trained):
    models = Path(trained["ckpt_dir"])
    state = torch.load(models / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state_dict
    full = torch.load(models / "training_state.pt", weights_only=True)
    assert full["iteration"] == 2 and len(full["optimizers"]) >= 1
    with open(Path(trained["output_dir"]) / "validation_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and {"val_score", "dice", "idh_macro_f1", "grade_roc_auc"} <= set(rows[0])


def test_evaluation_writes_report_and_plots(trained, tmp_path):
    out = tmp_path / "eval"
    wf = ConfigWorkflow(config_file=configs("train", "evaluate", "demo"), workflow_type="eval",
                        run_id="evaluating", bundle_root=str(BUNDLE), **{**trained, "output_dir": str(out)},
                        val_split="testing", **TINY)
    wf.initialize()
    wf.run()
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["tasks"]) == {"1p19q", "idh", "grade"} and report["dice_cases"] == 3
    assert all(len(r["confusion_matrix"]) == 2 for r in report["tasks"].values())
    assert (out / "roc_curves.png").stat().st_size > 0 and (out / "confusion_matrices.png").stat().st_size > 0


def test_inference_properties_and_outputs_on_original_grids(trained, cohort, tmp_path):
    out = tmp_path / "pred"
    wf = ConfigWorkflow(config_file=configs("inference", "demo"), workflow_type="infer", bundle_root=str(BUNDLE),
                        dataset_dir=str(cohort), ckpt_dir=trained["ckpt_dir"], output_dir=str(out), **TINY)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    testing = json.loads((cohort / "datalist.json").read_text())["testing"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(r["case_id"] for r in rows) == sorted(c["case_id"] for c in testing)
    for case in testing:
        pred = json.loads((out / f"{case['case_id']}.json").read_text())
        for task in ("1p19q", "idh", "grade"):
            assert sum(pred[task]["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        t1c = nib.load(cohort / case["t1c"])
        mask = nib.load(out / f"{case['case_id']}_seg.nii.gz")
        assert mask.shape == t1c.shape
        np.testing.assert_allclose(mask.affine, t1c.affine, atol=1e-4)
    wf2 = ConfigWorkflow(config_file=configs("inference", "demo"), workflow_type="infer",
                         bundle_root=str(BUNDLE), dataset_dir=str(cohort), ckpt_dir=trained["ckpt_dir"],
                         output_dir=str(out), **TINY)
    wf2.initialize()
    with pytest.raises(Exception) as err:  # a second run into the same folder is refused
        wf2.run()
    assert isinstance(err.value.__cause__, OutputExistsError) and "earlier run" in str(err.value.__cause__)


def test_inference_on_real_brats_case_returns_mask_on_its_lps_grid(trained, brats_case, tmp_path):
    case_dir = tmp_path / "in" / "BraTS2021_00000"
    case_dir.mkdir(parents=True)
    for key in ("t1c", "t2w"):
        (case_dir / Path(brats_case[key]).name).symlink_to(brats_case[key])
    out = tmp_path / "pred"
    wf = ConfigWorkflow(config_file=configs("inference", "demo"), workflow_type="infer", bundle_root=str(BUNDLE),
                        input_dir=str(tmp_path / "in"), ckpt_dir=trained["ckpt_dir"], output_dir=str(out), **TINY)
    wf.initialize()
    wf.run()
    src = nib.load(brats_case["t1c"])
    mask = nib.load(out / "BraTS2021_00000_seg.nii.gz")
    assert mask.shape == (240, 240, 155) and nib.aff2axcodes(mask.affine) == nib.aff2axcodes(src.affine)
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
    assert json.loads((out / "BraTS2021_00000.json").read_text())["idh"]["class"] in (0, 1)


def test_torchscript_export_matches_eager(trained, tmp_path):
    ts_path = tmp_path / "model.ts"
    overrides = []
    for k, v in TINY.items():
        overrides += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_path),
           "--ckpt_file", str(Path(trained["ckpt_dir"]) / "model.pt"), "--meta_file", str(CONFIGS / "metadata.json"),
           "--config_file", str([str(CONFIGS / "inference.yaml"), str(CONFIGS / "demo.yaml")]),
           "--bundle_root", str(BUNDLE), *overrides]
    subprocess.run(cmd, check=True, cwd=BUNDLE, capture_output=True)
    scripted = torch.jit.load(str(ts_path))
    wf = ConfigWorkflow(config_file=configs("inference", "demo"), workflow_type="infer", bundle_root=str(BUNDLE),
                        load_pretrain=False, **TINY)
    wf.initialize()
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(Path(trained["ckpt_dir"]) / "model.pt", weights_only=True))
    net.eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        eager, ts = net(x), scripted(x)
    assert set(eager) == set(ts)
    for k in eager:
        torch.testing.assert_close(ts[k], eager[k], rtol=1e-4, atol=1e-4)


def test_training_with_mlflow_tracking(cohort, tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "eval"
    wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train", run_id="training",
                        bundle_root=str(BUNDLE), tracking="mlflow", epochs=1, iters_per_epoch=1,
                        dataset_dir=str(cohort), output_dir=str(out), ckpt_dir=str(tmp_path / "models"), **TINY)
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (out / "mlruns.db").stat().st_size > 0


def _train(cohort, run, epochs=2, stop_at=None):
    """Train `epochs` x 2 iterations into `run`; with `stop_at`, stop after that iteration (a crash)."""
    wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train", run_id="training",
                        bundle_root=str(BUNDLE), epochs=epochs, iters_per_epoch=2, save_every=1,
                        dataset_dir=str(cohort), output_dir=str(run / "eval"), ckpt_dir=str(run / "models"), **TINY)
    wf.initialize()  # seeds, then builds the network
    trainer = wf.parser.get_parsed_content("train#trainer")
    if stop_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
    wf.run()
    return trainer.strategy.state_dict()


def test_interrupted_training_resumes_to_the_same_weights(cohort, tmp_path):
    straight = _train(cohort, tmp_path / "straight")
    _train(cohort, tmp_path / "resumed", stop_at=3)
    resumed = _train(cohort, tmp_path / "resumed")
    assert set(straight) == set(resumed)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)


def test_true_false_overrides_given_as_text_are_read_as_booleans(cohort, tmp_path):
    """The runner passes `--resume false` as the string "false", which Python would treat as true."""
    from scripts.handlers import TrainingState
    from scripts.options import as_flag

    wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train", run_id="training",
                        bundle_root=str(BUNDLE), resume="false", amp="true", dataset_dir=str(cohort),
                        output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "models"), **TINY)
    wf.initialize()
    handlers = wf.parser.get_parsed_content("train#handlers")
    assert [h.resume for h in handlers if isinstance(h, TrainingState)] == [False]
    assert wf.parser.get_parsed_content("use_amp") is False  # no CUDA here
    assert [as_flag(v, "x") for v in ("True", "off", 1, False)] == [True, False, True, False]
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        as_flag("maybe", "resume")
