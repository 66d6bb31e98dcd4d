"""The regime study's selection: the same grid for each strategy, the choice on validation, the stages in order."""

import csv
import json
import shutil
import socket
import subprocess
import sys

import pytest

from scripts import regime
from scripts.ablation import per_seed


def fake_run(output, stage, strategy, setting, seed, val_f1, test_f1=0.5):
    """A finished run: result.json and a validation CSV whose best `val_score` epoch has `val_f1`."""
    run = output / stage / regime.setting_name(setting) / strategy / f"seed_{seed}"
    (run / "eval").mkdir(parents=True)
    with open(run / "eval" / "validation_metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "val_score", "dice", "mean_macro_f1"])
        w.writerow([1, 1.5, 0.9, 0.99])          # a higher F1 at an epoch the trainer did not keep
        w.writerow([2, 1.6, 0.6, val_f1])
    tests = {"mean_macro_f1": test_f1, "dice": 0.7}
    (run / "result.json").write_text(json.dumps({"strategy": strategy, "seed": seed, "tasks": ["a"], "test": tests}))


def test_setting_names():
    assert regime.setting_name({"learning_rate": 1e-4, "surrogate_steps": 2}) == "lr1e-4_ss2"
    assert regime.setting_name({"learning_rate": 3e-4, "surrogate_steps": 1, "epochs": 32}) == "lr3e-4_ss1_ep32"


def test_every_strategy_gets_the_same_learning_rates():
    rates = {s: sorted({g["learning_rate"] for g in grid}) for s, grid in regime.GRID.items()}
    assert rates["equal"] == rates["igreg"] == [1e-4, 3e-4, 1e-3]
    assert sorted({g["surrogate_steps"] for g in regime.GRID["igreg"]}) == [1, 2]


def test_selection_on_the_kept_checkpoints_validation_f1_and_the_longer_run(tmp_path):
    grid = regime.GRID["equal"]
    assert regime.best_setting(tmp_path, "equal") is None                # nothing run yet
    for i, setting in enumerate(grid):
        for seed in regime.SELECTION_SEEDS[:2]:
            fake_run(tmp_path, "select", "equal", setting, seed, val_f1=0.6 + 0.1 * (i == 1))
    assert regime.best_setting(tmp_path, "equal") is None                # a seed missing everywhere
    for i, setting in enumerate(grid):
        fake_run(tmp_path, "select", "equal", setting, regime.SELECTION_SEEDS[2], val_f1=0.6 + 0.1 * (i == 1))
    assert regime.validation_score(tmp_path / "select" / "lr3e-4_ss1" / "equal" / "seed_100") == pytest.approx(0.7)
    assert regime.best_setting(tmp_path, "equal") == grid[1]
    longer = {**grid[1], "epochs": 32}
    for seed in regime.SELECTION_SEEDS:
        fake_run(tmp_path, "longer", "equal", longer, seed, val_f1=0.65)
    assert regime.best_setting(tmp_path, "equal") == grid[1]             # longer but worse: not taken
    shutil.rmtree(tmp_path / "longer")
    for seed in regime.SELECTION_SEEDS:
        fake_run(tmp_path, "longer", "equal", longer, seed, val_f1=0.75)
    assert regime.best_setting(tmp_path, "equal") == longer
    rows = regime.report(tmp_path)
    chosen = [r for r in rows if r["chosen"]]
    assert [(r["stage"], r["setting"]) for r in chosen] == [("longer", "lr3e-4_ss1_ep32")]
    assert (tmp_path / "regime.md").exists() and (tmp_path / "regime.png").exists()


def test_stages_run_in_order_with_the_chosen_setting(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(regime, "train_one", lambda strategy, seed, run_dir, configs, overrides: calls.append(
        (strategy, seed, run_dir.relative_to(tmp_path).parts[:2], overrides)))
    regime.main(stage="final", strategies="igreg", output=str(tmp_path), report_after=False)
    assert calls == []                                                  # the selection has not run
    regime.main(stage="select", strategies="igreg", output=str(tmp_path), report_after=False)
    assert len(calls) == 6 * 3 and {c[1] for c in calls} == set(regime.SELECTION_SEEDS)
    assert all(c[3]["learning_rate"] in regime.LEARNING_RATES and c[3]["diagnose_every"] == 10 for c in calls)
    for setting in regime.GRID["igreg"]:
        for seed in regime.SELECTION_SEEDS:
            fake_run(tmp_path, "select", "igreg", setting, seed, val_f1=0.8 if setting["learning_rate"] == 1e-4 and
                     setting["surrogate_steps"] == 2 else 0.6)
    calls.clear()
    regime.main(stage="final", strategies="igreg", output=str(tmp_path), report_after=False)
    assert [c[1] for c in calls] == list(regime.FINAL_SEEDS)
    assert calls[0][2] == ("final", "lr1e-4_ss2") and calls[0][3]["surrogate_steps"] == 2
    with pytest.raises(ValueError, match="no regime grid"):
        regime.main(stage="select", strategies="pcgrad", output=str(tmp_path))


def test_settings_share_one_strategys_grid_between_processes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(regime, "train_one", lambda strategy, seed, run_dir, configs, overrides: calls.append(
        run_dir.relative_to(tmp_path).parts[1]))
    regime.main(stage="select", strategies="igreg", output=str(tmp_path), report_after=False,
                settings="lr1e-4_ss1,lr1e-3_ss2")
    assert calls == ["lr1e-4_ss1"] * 3 + ["lr1e-3_ss2"] * 3


def test_a_run_another_live_process_trains_is_skipped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(regime, "train_one", lambda strategy, seed, run_dir, configs, overrides: calls.append(seed))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / "select" / "lr1e-4_ss1" / "equal" / "seed_101" / "models"
        busy.mkdir(parents=True)
        (busy / ".training.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        regime.main(stage="select", strategies="equal", output=str(tmp_path), report_after=False,
                    settings="lr1e-4_ss1")
    finally:
        other.kill()
    assert calls == [100, 102]
    assert (tmp_path / "select" / "lr1e-4_ss1" / "equal" / "seed_100" / "models" / ".training.lock").exists()
    fake_run(tmp_path, "select", "equal", regime.GRID["equal"][1], 100, val_f1=0.7)
    assert not regime.claimed_elsewhere(tmp_path / "select" / "lr3e-4_ss1" / "equal" / "seed_100")   # finished
    assert not (tmp_path / "select" / "lr3e-4_ss1" / "equal" / "seed_100" / "models").exists()


def test_report_pairs_igreg_with_equal_by_seed(tmp_path):
    for seed, (mine, theirs) in zip(regime.SELECTION_SEEDS, [(0.70, 0.80), (0.72, 0.80), (0.68, 0.81)]):
        fake_run(tmp_path, "select", "igreg", {"learning_rate": 1e-4, "surrogate_steps": 1}, seed, val_f1=mine)
        fake_run(tmp_path, "select", "equal", {"learning_rate": 1e-4, "surrogate_steps": 1}, seed, val_f1=theirs)
    rows = regime.paired_rows(tmp_path)
    assert [(r["run"], r["minus"], r["seeds"]) for r in rows] == [
        ("select igreg lr1e-4_ss1", "select equal lr1e-4_ss1", 3)]
    assert rows[0]["mean"] == pytest.approx(-0.31 / 3)                    # seed by seed: -0.10, -0.08, -0.13
    assert -0.13 <= rows[0]["low"] <= rows[0]["mean"] <= rows[0]["high"] <= -0.08
    regime.report(tmp_path)
    row = "| select igreg lr1e-4_ss1 | select equal lr1e-4_ss1 | 3 | -0.103 [-0.130, -0.080] |"
    assert row in (tmp_path / "regime.md").read_text()
    for seed, (mine, theirs) in zip(regime.FINAL_SEEDS, [(0.74, 0.80), (0.75, 0.78)]):
        fake_run(tmp_path, "final", "igreg", {"learning_rate": 1e-4, "surrogate_steps": 1}, seed, 0.7, test_f1=mine)
        fake_run(tmp_path, "final", "equal", {"learning_rate": 1e-4, "surrogate_steps": 1}, seed, 0.7, test_f1=theirs)
    assert per_seed(regime.final_results(tmp_path)) == [
        {"seed": 0, "equal": 0.80, "igreg": 0.74}, {"seed": 1, "equal": 0.78, "igreg": 0.75}]
    regime.report(tmp_path)
    text = (tmp_path / "final" / "ablation.md").read_text()
    assert "| 0 | 0.800 | 0.740 (-0.060) |" in text and "| 1 | 0.780 | 0.750 (-0.030) |" in text
