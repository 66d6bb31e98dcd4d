"""Every strategy trains through the bundle's configs, and the ablation script writes its table and plot."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE
from monai.bundle import ConfigWorkflow

from scripts.ablation import main as ablation
from scripts.data import generate_cohort
from scripts.strategies import STRATEGIES

CONFIGS = [str(BUNDLE / "configs" / f"{n}.yaml") for n in ("train", "demo")]
TINY = {  # a 32^3 world at 8 mm with the narrowest network
    "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32], "num_workers": 0, "cache": "none",
    "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16], "network_def#cardinality": 2,
    "network_def#depths": [1, 1, 1, 1],
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, seed=0, n_train_cls=12, n_train_seg=4, n_val=4, n_test=1, spacing=8.0)
    return root


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_two_iterations_through_the_configs(name, cohort, tmp_path):
    wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="train", run_id="training", bundle_root=str(BUNDLE),
                        mtl_strategy=name, epochs=1, iters_per_epoch=2, val_interval=2, diagnose_every=2,
                        dataset_dir=str(cohort), output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "models"),
                        **{"igreg#surrogate_steps": 1}, **TINY)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    before = [p.detach().clone() for p in trainer.network.parameters()]
    wf.run()
    assert trainer.state.iteration == 2 and not trainer.strategy.skipped
    assert all(torch.isfinite(v) for v in trainer.state.output[0].values())
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.network.parameters()))
    rows = list(csv.DictReader(open(tmp_path / "eval" / "gradient_conflicts.csv")))
    assert [r["iteration"] for r in rows] == ["2"]


def test_ablation_writes_table_and_plot_and_skips_finished_runs(cohort, tmp_path, capsys):
    out = tmp_path / "ablation"
    options = dict(strategies="equal,pcgrad", seeds=0, epochs=2, iters_per_epoch=1, output=str(out), diagnose_every=1,
                   dataset_dir=str(cohort), **TINY)
    ablation(**options)
    result = json.loads((out / "pcgrad" / "seed_0" / "result.json").read_text())
    assert result["iterations"] == 2 and [x for x, _ in result["curve"]] == [1, 2]
    assert 0 <= result["conflict_fraction"] <= 1 and result["s_per_it"] > 0
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [r["strategy"] for r in rows] == ["equal", "pcgrad"] and rows[0]["seeds"] == "1"
    assert {"1p19q_macro_f1_mean", "grade_roc_auc_std", "dice_mean", "conflict_fraction_mean", "s_per_it_mean"} <= set(
        rows[0])
    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| strategy | seeds | 1p19q F1 | 1p19q AUC") and len(table) == 4
    assert (out / "ablation_f1.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (out / "equal" / "seed_0" / "result.json").stat().st_mtime_ns
    ablation(**{**options, "strategies": "equal"})               # finished: read back, not trained again
    assert (out / "equal" / "seed_0" / "result.json").stat().st_mtime_ns == stamp
    assert "[ablation 1/1] equal, seed 0" in capsys.readouterr().out
