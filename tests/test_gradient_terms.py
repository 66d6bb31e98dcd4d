"""The per-term diagnostics figure and table, from gradient_conflicts.csv files of seed runs."""

import csv

import numpy as np
import pytest

from scripts.gradient_terms import load_group, main, smooth


def write_run(folder, seed, rows):
    path = folder / f"seed_{seed}" / "eval"
    path.mkdir(parents=True)
    with open(path / "gradient_conflicts.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_groups_mean_over_seeds_and_equal_read_from_its_task_columns(tmp_path, capsys):
    igreg, equal = tmp_path / "a" / "igreg", tmp_path / "a" / "equal"
    for seed, scale in ((0, 1.0), (1, 3.0)):
        write_run(igreg, seed, [{"iteration": i, "term_norm_idh": scale * i, "term_sign_idh": 0.5,
                                 "term_norm_margin": 10.0, "term_sign_margin": 0.6, "log_var_cls": 0.01 * i}
                                for i in (10, 20)])
        write_run(equal, seed, [{"iteration": i, "norm_idh": 2.0, "sign_agree_idh": 0.7} for i in (10, 20, 30)])
    x, values = load_group(equal)
    assert list(x) == [10, 20, 30] and values["term_norm_idh"].shape == (2, 3)
    main(f"{igreg},{equal}", output=str(tmp_path / "new_folder" / "out"))
    rows = {(r["group"], r["term"]): r for r in csv.DictReader(open(tmp_path / "new_folder" / "out.csv"))}
    assert float(rows[("a/igreg", "idh")]["grad_norm"]) == pytest.approx(30.0)      # mean of 10, 20, 30, 60
    assert float(rows[("a/equal", "idh")]["sign_agree"]) == pytest.approx(0.7)
    assert [t for g, t in rows if g == "a/igreg"] == ["idh", "margin"]              # the paper's order
    assert (tmp_path / "new_folder" / "out.png").stat().st_size > 10_000
    assert "| a/igreg | margin | 2 | 10 | 0.600 |" in capsys.readouterr().out


def test_smooth_keeps_a_constant_and_the_length():
    y = np.array([1.0, 1.0, 1.0, 4.0, 1.0, 1.0])
    assert np.allclose(smooth(np.ones(7), 3), 1.0)
    assert smooth(y, 3)[3] == pytest.approx(2.0) and len(smooth(y, 3)) == len(y)
