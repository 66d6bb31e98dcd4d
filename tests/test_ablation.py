"""Every strategy trains through the bundle's configs, and the ablation script trains and tests paired
seeds, compares each strategy with equal, and writes its table and plot."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE
from monai.bundle import ConfigWorkflow

from scripts.ablation import main as ablation
from scripts.ablation import paired_difference, per_seed, per_seed_lines, summarize
from scripts.data import generate_cohort
from scripts.mtl import STRATEGIES

CONFIGS = [str(BUNDLE / "configs" / f"{n}.yaml") for n in ("train", "demo")]
TINY = {  # a 32^3 world at 8 mm with the narrowest network
    "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32], "num_workers": 0, "cache": "none",
    "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16], "network_def#cardinality": 2,
    "network_def#depths": [1, 1, 1, 1],
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, seed=0, n_train_cls=12, n_train_seg=4, n_val=4, n_test=3, spacing=8.0)
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


def test_paired_difference_is_a_seeded_percentile_bootstrap():
    assert paired_difference([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2, 0.2))
    mean, low, high = paired_difference([0.0, 1.0, 0.5, 0.1])
    assert mean == pytest.approx(0.4) and 0.0 <= low < mean < high <= 1.0
    assert paired_difference([0.0, 1.0, 0.5, 0.1]) == (mean, low, high)          # fixed seed
    assert all(math.isnan(v) for v in paired_difference([]))
    mean, low, high = paired_difference([0.1, 0.3])                              # too few pairs: no interval
    assert mean == pytest.approx(0.2) and math.isnan(low) and math.isnan(high)


def test_summary_pairs_seeds_with_equal():
    def run(strategy, seed, f1):
        return {"strategy": strategy, "seed": seed, "tasks": ["idh"], "test": {"mean_macro_f1": f1, "dice": 0.5},
                "conflict_fraction": 0.25, "s_per_it": 1.0}

    results = [run("equal", 0, 0.5), run("equal", 1, 0.7), run("equal", 2, 0.6), run("igreg", 0, 0.6),
               run("igreg", 1, 0.9), run("igreg", 2, 0.7), run("igreg", 3, 0.1)]     # seed 3 has no equal run
    equal, igreg = summarize(results)
    assert equal["pairs"] == 0 and math.isnan(equal["delta_f1_mean"])
    assert igreg["seeds"] == 4 and igreg["pairs"] == 3 and igreg["delta_f1_mean"] == pytest.approx(0.4 / 3)
    assert igreg["mean_macro_f1_mean"] == pytest.approx(2.3 / 4) and igreg["dice_std"] == 0
    assert (igreg["delta_f1_ci_low"], igreg["delta_f1_ci_high"]) == pytest.approx((0.1, 0.2))
    assert [r["seed"] for r in per_seed(results)] == [0, 1, 2] and per_seed(results)[1] == {
        "seed": 1, "equal": 0.7, "igreg": 0.9}
    assert per_seed_lines(results)[2:] == ["| 0 | 0.500 | 0.600 (+0.100) |", "| 1 | 0.700 | 0.900 (+0.200) |",
                                           "| 2 | 0.600 | 0.700 (+0.100) |"]


def test_ablation_trains_tests_tables_and_skips_finished_runs(cohort, tmp_path, capsys):
    out = tmp_path / "ablation"
    options = dict(strategies="equal,pcgrad", seeds="0,1", epochs=2, iters_per_epoch=1, output=str(out),
                   diagnose_every=1, dataset_dir=str(cohort), threads=1, table=False, **TINY)
    ablation(**{**options, "seeds": 0})                       # one process per seed, no table
    ablation(**{**options, "seeds": 1})
    assert not (out / "ablation.csv").exists()
    results = {(s, seed): json.loads((out / s / f"seed_{seed}" / "result.json").read_text())
               for s in ("equal", "pcgrad") for seed in (0, 1)}
    result = results[("pcgrad", 0)]
    assert result["iterations"] == 2 and [x for x, _ in result["curve"]] == [1, 2]
    assert 0 <= result["conflict_fraction"] <= 1 and result["s_per_it"] > 0
    assert all(0 <= result[f"sign_agree_{t}"] <= 1 for t in ("1p19q", "idh", "grade", "seg"))
    report = json.loads((out / "pcgrad" / "seed_0" / "test" / "metrics.json").read_text())
    assert result["test"]["mean_macro_f1"] == pytest.approx(report["mean_macro_f1"])  # the testing split's report
    splits = json.loads((cohort / "datalist.json").read_text())
    assert report["dice_cases"] == sum("seg" in c for c in splits["testing"]) != len(splits["validation"])
    assert {"1p19q_macro_f1", "grade_roc_auc", "dice"} <= set(result["test"])

    legacy = out / "equal" / "seed_1" / "result.json"           # trained before, not yet tested
    legacy.write_text(json.dumps({k: v for k, v in results[("equal", 1)].items() if k != "test"}))
    state = out / "equal" / "seed_1" / "models" / "training_state.pt"
    stamp, finished = state.stat().st_mtime_ns, (out / "pcgrad" / "seed_0" / "result.json").stat().st_mtime_ns
    ablation(**{**options, "strategies": "equal,pcgrad,cagrad", "train": "false", "table": True})
    assert state.stat().st_mtime_ns == stamp and "test" in json.loads(legacy.read_text())   # tested, not retrained
    assert (out / "pcgrad" / "seed_0" / "result.json").stat().st_mtime_ns == finished     # read back
    assert not (out / "cagrad").exists() and "cagrad, seed 0: not trained, left out" in capsys.readouterr().out

    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [r["strategy"] for r in rows] == ["equal", "pcgrad"] and rows[0]["seeds"] == "2"
    assert {"1p19q_macro_f1_mean", "grade_roc_auc_std", "dice_mean", "conflict_fraction_mean", "s_per_it_mean",
            "sign_agree_seg_mean", "delta_f1_ci_low"} <= set(rows[0])
    diffs = [results[("pcgrad", s)]["test"]["mean_macro_f1"] - results[("equal", s)]["test"]["mean_macro_f1"]
             for s in (0, 1)]
    assert rows[0]["pairs"] == "0" and rows[1]["pairs"] == "2"
    assert float(rows[1]["delta_f1_mean"]) == pytest.approx(sum(diffs) / 2)
    assert float(rows[1]["mean_macro_f1_mean"]) == pytest.approx(
        sum(results[("pcgrad", s)]["test"]["mean_macro_f1"] for s in (0, 1)) / 2)
    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| strategy | seeds | 1p19q F1 | 1p19q AUC") and table[4] == ""
    assert "Δ mean F1 vs equal" in table[0] and "(n=" not in table[2]
    assert "(n=2, too few pairs for an interval)" in table[3]
    assert table[7:9] == ["| seed | equal | pcgrad |", "|---:|---:|---:|"] and len(table) == 11   # seed by seed
    for seed, line in zip((0, 1), table[9:]):
        mine, theirs = (results[(s, seed)]["test"]["mean_macro_f1"] for s in ("pcgrad", "equal"))
        assert line == f"| {seed} | {theirs:.3f} | {mine:.3f} ({mine - theirs:+.3f}) |"
    assert (out / "ablation_f1.png").read_bytes()[:4] == b"\x89PNG"
