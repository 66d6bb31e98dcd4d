"""Regime study: does a strategy's result depend on the training regime, and which regime does each one
get at its best? The same search for every strategy, selection on validation, scores on test.

Stages (each run is `scripts.ablation.train_one`: the bundle's training and evaluation configs, a
finished run is read back, an interrupted one resumes):

1. `select`: every setting of `GRID[strategy]` (learning rate; for IGReg also `surrogate_steps`) with the
   selection seeds (100, 101, 102); the best setting of each strategy is the one with the highest mean
   over seeds of the validation mean macro-F1 of the checkpoint the trainer kept (Dice + mean macro-F1).
2. `longer`: that setting at twice the demo's epochs, the same seeds; kept if its validation score is
   higher than at the demo's length.
3. `final`: the chosen regime of each strategy with fresh seeds (0-4), scored on the testing split; the
   table gives the paired difference to `equal` with its bootstrap interval (`scripts.ablation.summarize`).

Run from the bundle folder, one process per core (processes given the same runs take turns: a run another
live process trains is skipped; `--settings lr1e-4_ss1,lr3e-4_ss1` gives a process part of a grid), each stage
after the one before, then the report:

    R="python -m scripts.regime --threads 1 --report_after=False"
    $R --stage select & $R --stage select & wait
    $R --stage longer & $R --stage longer & wait
    $R --stage final & $R --stage final & wait
    python -m scripts.regime --stage report

Layout: `<output>/<stage>/<setting>/<strategy>/seed_<seed>/` (as `scripts.ablation`); the report writes
`<output>/regime.md` and `regime.csv` (one row per stage, strategy and setting, then the paired differences of
`paired_rows`), `regime.png`, and the final stage's paired table `<output>/final/ablation.md` (as `scripts.ablation`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
import torch

from scripts.ablation import (
    DEFAULT_CONFIGS,
    _as_bool,
    _as_list,
    _read_csv,
    paired_difference,
    read_result,
    summarize,
    train_one,
    write_table,
)
from scripts.cli import run
from scripts.options import TrainingLockError, acquire_training_lock

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEARNING_RATES = (1e-4, 3e-4, 1e-3)     # the reference's, between, the demo's
GRID: dict[str, list[dict[str, Any]]] = {
    "equal": [{"learning_rate": lr, "surrogate_steps": 1} for lr in LEARNING_RATES],
    "igreg": [{"learning_rate": lr, "surrogate_steps": s} for lr in LEARNING_RATES for s in (1, 2)],
}
SELECTION_SEEDS = (100, 101, 102)
FINAL_SEEDS = (0, 1, 2, 3, 4)
DEMO_EPOCHS = 16
STAGES = ("select", "longer", "final")


def setting_name(setting: dict[str, Any]) -> str:
    """`lr1e-4_ss2` (learning rate, surrogate steps), `_ep32` added when the epochs are not the demo's."""
    lr = f"{float(setting['learning_rate']):.0e}".replace("e-0", "e-")
    name = f"lr{lr}_ss{int(setting['surrogate_steps'])}"
    epochs = int(setting.get("epochs", DEMO_EPOCHS))
    return name if epochs == DEMO_EPOCHS else f"{name}_ep{epochs}"


def validation_score(run_dir: Path) -> float | None:
    """Validation mean macro-F1 of the checkpoint the trainer kept (the epoch of the best `val_score`),
    or None before the run has finished."""
    if not (run_dir / "result.json").exists():
        return None
    rows = _read_csv(run_dir / "eval" / "validation_metrics.csv", "epoch")
    best = max(rows, key=lambda r: r["val_score"])
    return float(best["mean_macro_f1"])


def scores(output: Path, stage: str, strategy: str, setting: dict[str, Any], seeds: Sequence[int]) -> dict[int, float]:
    """Seed -> validation score of each finished run of `setting`."""
    found = {}
    for seed in seeds:
        value = validation_score(output / stage / setting_name(setting) / strategy / f"seed_{seed}")
        if value is not None:
            found[seed] = value
    return found


def best_setting(output: Path, strategy: str, seeds: Sequence[int] = SELECTION_SEEDS) -> dict[str, Any] | None:
    """The strategy's regime: the grid setting with the best mean validation score over all `seeds`
    (None until every setting has them all), replaced by its twice-as-long version if that scores higher."""
    means = []
    for setting in GRID[strategy]:
        found = scores(output, "select", strategy, setting, seeds)
        if len(found) < len(seeds):
            return None
        means.append((float(np.mean(list(found.values()))), setting))
    _, best = max(means, key=lambda m: m[0])
    longer = {**best, "epochs": 2 * DEMO_EPOCHS}
    found_short = scores(output, "select", strategy, best, seeds)
    found_long = scores(output, "longer", strategy, longer, seeds)
    if len(found_long) == len(seeds) and np.mean(list(found_long.values())) > np.mean(list(found_short.values())):
        return longer
    return best


def _runs(stage: str, strategy: str, output: Path) -> list[tuple[dict[str, Any], Sequence[int]]]:
    """(setting, seeds) to train for a stage; empty while the stage before is unfinished."""
    if stage == "select":
        return [(setting, SELECTION_SEEDS) for setting in GRID[strategy]]
    chosen = best_setting(output, strategy)
    if chosen is None:
        print(f"[regime] {strategy}: the selection is not finished, stage {stage} waits", flush=True)
        return []
    if stage == "longer":
        return [({**{k: v for k, v in chosen.items() if k != "epochs"}, "epochs": 2 * DEMO_EPOCHS}, SELECTION_SEEDS)]
    return [(chosen, FINAL_SEEDS)]


def claimed_elsewhere(run_dir: Path) -> bool:
    """True when another live process trains `run_dir`; otherwise this process takes the run's lock
    (the training's own, on its checkpoint folder), so that processes sharing a stage take turns. A
    finished run (tested) is read back, not locked."""
    if "test" in (read_result(run_dir) or {}):
        return False
    try:
        acquire_training_lock(run_dir / "models")
    except TrainingLockError:
        return True
    return False


def paired_rows(output: Path) -> list[dict[str, Any]]:
    """Paired differences of the validation mean macro-F1 over the seeds both runs have (mean and 95%
    bootstrap interval, `scripts.ablation.paired_difference`): each IGReg setting against `equal` at the same
    learning rate, IGReg's two surrogate steps against one, and each setting at twice the epochs against the
    demo's length."""
    def demo(lr: float, steps: int) -> dict[str, Any]:
        return {"learning_rate": lr, "surrogate_steps": steps}

    pairs = [(("igreg", "select", demo(lr, steps)), ("equal", "select", demo(lr, 1)))
             for lr in LEARNING_RATES for steps in (1, 2)]
    pairs += [(("igreg", "select", demo(lr, 2)), ("igreg", "select", demo(lr, 1))) for lr in LEARNING_RATES]
    pairs += [((strategy, "longer", {**base, "epochs": 2 * DEMO_EPOCHS}), (strategy, "select", base))
              for strategy, grid in GRID.items() for base in grid]
    rows = []
    for (strategy_a, stage_a, a), (strategy_b, stage_b, b) in pairs:
        found_a = scores(output, stage_a, strategy_a, a, SELECTION_SEEDS)
        found_b = scores(output, stage_b, strategy_b, b, SELECTION_SEEDS)
        seeds = sorted(set(found_a) & set(found_b))
        if not seeds:
            continue
        mean, low, high = paired_difference([found_a[s] - found_b[s] for s in seeds])
        rows.append({"run": f"{stage_a} {strategy_a} {setting_name(a)}", "minus": f"{stage_b} {strategy_b} "
                     f"{setting_name(b)}", "seeds": len(seeds), "mean": mean, "low": low, "high": high})
    return rows


def final_results(output: Path) -> list[dict[str, Any]]:
    """The `result.json` of every finished run of the final stage."""
    return [read_result(p.parent) for p in sorted((output / "final").glob("*/*/seed_*/result.json"))]


def report(output: Path) -> list[dict[str, Any]]:
    """One row per stage, strategy and setting with finished runs: seeds, validation mean macro-F1 (mean,
    sd, per seed), test mean macro-F1 and Dice (mean), and whether it is the strategy's chosen regime;
    then the final stage's paired table (`final/ablation.md`, `final/ablation.csv`) and the plot."""
    rows = []
    chosen_of = {strategy: best_setting(output, strategy) for strategy in GRID}
    for stage in STAGES:
        for strategy, grid in GRID.items():
            chosen = chosen_of[strategy]
            for base in grid:
                settings = [base, {**base, "epochs": 2 * DEMO_EPOCHS}]
                for setting in settings:
                    seeds = FINAL_SEEDS if stage == "final" else SELECTION_SEEDS
                    found = scores(output, stage, strategy, setting, seeds)
                    if not found:
                        continue
                    run_dirs = [output / stage / setting_name(setting) / strategy / f"seed_{s}" for s in found]
                    tests = [read_result(run_dir)["test"] for run_dir in run_dirs]
                    rows.append({"stage": stage, "strategy": strategy, "setting": setting_name(setting),
                                 "seeds": len(found), "val_f1_mean": float(np.mean(list(found.values()))),
                                 "val_f1_sd": float(np.std(list(found.values()), ddof=1)) if len(found) > 1 else np.nan,
                                 "val_f1_per_seed": " ".join(f"{found[s]:.3f}" for s in sorted(found)),
                                 "test_f1_mean": float(np.mean([t["mean_macro_f1"] for t in tests])),
                                 "test_dice_mean": float(np.mean([t["dice"] for t in tests])),
                                 "chosen": chosen is not None and setting_name(chosen) == setting_name(setting)})
    finals = final_results(output)
    if rows:
        _write_rows(rows, output)
        _plot(rows, output / "regime.png")
    if finals and any(r["strategy"] == "equal" for r in finals):
        table = summarize(finals)
        final_dir = output / "final"
        write_table(table, finals[0]["tasks"], final_dir, finals)
    return rows


def _write_rows(rows: list[dict[str, Any]], output: Path) -> None:
    with open(output / "regime.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| stage | strategy | setting | seeds | validation mean F1 (seeds) | test mean F1 | test Dice | chosen |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|:-:|"]
    for r in rows:
        sd = "" if np.isnan(r["val_f1_sd"]) else f" ± {r['val_f1_sd']:.3f}"
        lines.append(f"| {r['stage']} | {r['strategy']} | {r['setting']} | {r['seeds']} | {r['val_f1_mean']:.3f}{sd} "
                     f"({r['val_f1_per_seed']}) | {r['test_f1_mean']:.3f} | {r['test_dice_mean']:.3f} | "
                     f"{'yes' if r['chosen'] else ''} |")
    paired = paired_rows(output)
    if paired:
        lines += ["", "Paired differences of the validation mean macro-F1 (95% bootstrap interval over the seeds both",
                  "have):", "", "| run | minus | seeds | difference [95% CI] |", "|---|---|---:|---:|"]
        for r in paired:
            interval = "" if np.isnan(r["low"]) else f" [{r['low']:+.3f}, {r['high']:+.3f}]"
            lines.append(f"| {r['run']} | {r['minus']} | {r['seeds']} | {r['mean']:+.3f}{interval} |")
    (output / "regime.md").write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation mean macro-F1 of every selection setting, per strategy: each seed a dot, the mean a bar."""
    selected = [r for r in rows if r["stage"] != "final"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(selected)), 4))
    for i, r in enumerate(selected):
        values = [float(v) for v in r["val_f1_per_seed"].split()]
        color = "tab:blue" if r["strategy"] == "equal" else "tab:orange"
        ax.bar(i, r["val_f1_mean"], color=color, alpha=0.35)
        ax.plot([i] * len(values), values, "o", color=color, markersize=4)
    ax.set_xticks(range(len(selected)), [f"{r['strategy']}\n{r['setting']}" for r in selected], fontsize=7)
    ax.set_ylabel("validation mean macro-F1 (kept checkpoint)")
    ax.set_ylim(0.4, 1.0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(stage: str = "report", strategies: Any = tuple(GRID), output: str = "eval/regime",
         config_file: Any = DEFAULT_CONFIGS, threads: int | None = None, diagnose_every: int = 10,
         report_after: bool = True, settings: Any = None, **overrides: Any) -> None:
    """Train the runs of `stage` (select | longer | final) for `strategies`, or only `report`.

    Args:
        stage: which runs to train; `report` trains nothing and writes the tables and the plot.
        strategies: names of `GRID` (comma-separated or a list).
        output: folder of the study.
        config_file: the training configs (train.yaml then demo.yaml).
        threads: torch CPU threads (1 for one process per core).
        diagnose_every: iterations between gradient measurements.
        report_after: write the report once the runs are done (False for per-core processes).
        settings: only these setting names (e.g. `lr1e-4_ss1,lr3e-4_ss2`), to share one strategy's runs
            between processes; default all of the stage's.
        overrides: any other config id -> value for every run (e.g. dataset_dir).
    """
    out = Path(output)
    only = None if settings is None else set(_as_list(settings))
    if threads:
        torch.set_num_threads(int(threads))
    if stage != "report":
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES} or 'report', got {stage!r}")
        for strategy in _as_list(strategies):
            if strategy not in GRID:
                raise ValueError(f"no regime grid for strategy {strategy!r}; known: {sorted(GRID)}")
            for setting, seeds in _runs(stage, strategy, out):
                if only is not None and setting_name(setting) not in only:
                    continue
                for seed in seeds:
                    run_dir = out / stage / setting_name(setting) / strategy / f"seed_{seed}"
                    if claimed_elsewhere(run_dir):
                        print(f"[regime] {run_dir} is trained by another process: skipped", flush=True)
                        continue
                    print(f"[regime] {stage} {strategy} {setting_name(setting)} seed {seed}", flush=True)
                    train_one(strategy, seed, run_dir, _as_list(config_file),
                              {**overrides, **setting, "diagnose_every": diagnose_every})
    if stage == "report" or _as_bool(report_after):
        rows = report(out)
        print(f"[regime] {len(rows)} settings with finished runs; wrote {out / 'regime.md'}", flush=True)


if __name__ == "__main__":
    run(main)
