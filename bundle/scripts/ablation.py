"""Ablation of the multi-task strategies, a paired comparison over seeds: train each strategy with
each seed through the bundle's training configs (same data, network, optimizer, iterations; the
strategies of one seed see the same main batches, in the same order, with the same augmentations),
keep each run's checkpoint selected on validation (the trainer's best `model.pt`: Dice + mean
macro-F1), evaluate it on the testing split through the bundle's evaluation config, then write one
table and one plot.

Run from the bundle folder, e.g. one process per seed (one core each), then the table:

    python -m scripts.ablation --seeds 0 --threads 1 --table=False &
    python -m scripts.ablation --seeds 1 --threads 1 --table=False &
    wait
    python -m scripts.ablation --seeds 0,1 --train=False

Each run goes to `<output>/<strategy>/seed_<seed>/` (`eval/`: validation and gradient-conflict CSVs,
TensorBoard; `models/`; `test/`: the test report; `result.json` once it has been trained and tested).
A finished run is not run again, one trained but not tested is tested, and an interrupted one
continues from its training state, so a command can simply be started again. Any other keyword
(`--dataset_dir`, `--datalist`, `--val_interval`, ...) overrides the configs.

Outputs in `<output>`: `ablation.csv` and `ablation.md`, per strategy: seeds, mean ± sample standard
deviation over seeds of the test scores (per task macro-F1 and AUC, mean macro-F1, Dice), the paired
difference of test mean macro-F1 to `equal` (mean over the seeds both have of strategy − equal, with
a 95% percentile bootstrap interval over seeds, n pairs), the mean fraction of conflicting
task-gradient pairs, each task's mean sign agreement with the applied update and the seconds per
training step, then the test mean macro-F1 seed by seed; `ablation_f1.png`: validation mean macro-F1
against iterations, and the paired differences.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism

from scripts.cli import run
from scripts.data import ensure_demo_cohort
from scripts.mtl.base import MTLStrategy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
DEFAULT_STRATEGIES = ("igreg", "igreg_no_dpa", "igreg_no_stdgp", "equal", "uncertainty", "pcgrad", "cagrad")
DEFAULT_CONFIGS = (str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "demo.yaml"))
EVALUATE_CONFIG = str(BUNDLE / "configs" / "evaluate.yaml")


def _as_list(value: Any) -> list:
    """A comma-separated string, a single value or a sequence, as a list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, Iterable) else [value]


def _as_bool(value: Any) -> bool:
    """A flag given as a bool or as text ("false", "0", "no" are False)."""
    return value.strip().lower() not in ("false", "0", "no", "") if isinstance(value, str) else bool(value)


class StepTimer:
    """Wall-clock and process CPU seconds spent in `strategy.step` (forward, backward passes and
    update: no data loading, validation or diagnostics)."""

    def __init__(self, strategy: MTLStrategy) -> None:
        self.seconds, self.cpu_seconds, self.steps = 0.0, 0.0, 0
        step = strategy.step

        def timed(batch: dict) -> dict:
            start, cpu = time.perf_counter(), time.process_time()
            out = step(batch)
            if strategy.device.type == "cuda":
                torch.cuda.synchronize(strategy.device)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu
            self.steps += 1
            return out

        strategy.step = timed


def _read_csv(path: Path, key: str) -> list[dict[str, float]]:
    """Rows of a numeric CSV, the last row kept for each value of `key` (a resumed run may repeat some)."""
    if not path.exists():
        return []
    rows: dict[float, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            parsed = {k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
            rows[parsed[key]] = parsed
    return [rows[k] for k in sorted(rows)]


def _train(strategy: str, seed: int, run_dir: Path, config_file: Sequence[str], overrides: dict) -> dict:
    """Train one strategy with one seed into `run_dir` (continuing an interrupted run); its result
    without the test scores."""
    eval_dir = run_dir / "eval"
    wf = ConfigWorkflow(config_file=list(config_file), workflow_type="train", run_id="training",
                        bundle_root=str(BUNDLE), **{**overrides, "mtl_strategy": strategy, "seed": seed,
                                                    "output_dir": str(eval_dir), "ckpt_dir": str(run_dir / "models")})
    wf.initialize()
    parser = wf.parser
    dataset_dir = parser.get_parsed_content("dataset_dir")
    if os.path.abspath(dataset_dir) == os.path.abspath(parser.get_parsed_content("demo_dir")):
        ensure_demo_cohort(dataset_dir)
    trainer = parser.get_parsed_content("train#trainer")  # `initialize` seeded and built the network
    set_determinism(seed=seed)  # seeded again before the run, as the ablation has always done (same results)
    timer = StepTimer(trainer.strategy)
    start = time.perf_counter()
    wf.run()
    wf.finalize()
    iters = int(parser.get_parsed_content("iters_per_epoch"))
    validation = _read_csv(eval_dir / "validation_metrics.csv", "epoch")
    diagnostics = _read_csv(eval_dir / "gradient_conflicts.csv", "iteration")
    tasks = list(parser.get_parsed_content("tasks"))
    return {
        "strategy": strategy, "seed": seed, "iterations": trainer.state.iteration,
        "tasks": tasks,
        "s_per_it": timer.seconds / max(timer.steps, 1), "cpu_s_per_it": timer.cpu_seconds / max(timer.steps, 1),
        "wall_s": time.perf_counter() - start,
        **_run_means(diagnostics, run_names(tasks)[:-1]),
        "final": validation[-1] if validation else {},
        "curve": [[int(r["epoch"]) * iters, r.get("mean_macro_f1", float("nan"))] for r in validation],
    }


def _run_means(rows: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Mean over the run's diagnostic rows of each column in `names` (NaNs left out; NaN without any)."""
    means = {}
    for name in names:
        values = np.array([r.get(name, np.nan) for r in rows], dtype=float)
        means[name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return means


def evaluate_on_test(strategy: str, seed: int, run_dir: Path, config_file: Sequence[str], overrides: dict) -> dict:
    """Scores on the testing split of the run's checkpoint selected on validation (`models/model.pt`),
    evaluated through the bundle's evaluation config (report in `run_dir/test/`)."""
    wf = ConfigWorkflow(config_file=list(config_file), workflow_type="eval", run_id="evaluating",
                        bundle_root=str(BUNDLE), **{**overrides, "mtl_strategy": strategy, "seed": seed,
                                                    "val_split": "testing", "output_dir": str(run_dir / "test"),
                                                    "ckpt_dir": str(run_dir / "models")})
    wf.initialize()
    wf.run()
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    wf.finalize()
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def eval_configs(config_file: Sequence[str], evaluate: str = EVALUATE_CONFIG) -> list[str]:
    """The training configs with the evaluation config merged right after the first (train.yaml)."""
    return [config_file[0], evaluate, *config_file[1:]]


def read_result(run_dir: Path) -> dict | None:
    """`result.json` of a run, or None before its training has finished; a finished run's has "test"."""
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_one(strategy: str, seed: int, run_dir: Path, config_file: Sequence[str], overrides: dict) -> dict:
    """Train one strategy with one seed into `run_dir`, test its selected checkpoint, and return its
    `result.json` content. A finished run is read back; one trained but not tested is tested."""
    result_path = run_dir / "result.json"
    result = read_result(run_dir)
    if result is not None and "test" in result:
        return result
    if result is None:
        result = _train(strategy, seed, run_dir, config_file, overrides)
    result["test"] = evaluate_on_test(strategy, seed, run_dir, eval_configs(config_file), overrides)
    result_path.write_text(json.dumps(result, indent=1) + "\n")  # once tested: a finished run
    return result


def metric_names(tasks: Sequence[str]) -> list[str]:
    """Test-score columns, in order."""
    return [f"{t}_{m}" for t in tasks for m in ("macro_f1", "roc_auc")] + ["mean_macro_f1", "dice"]


def run_names(tasks: Sequence[str]) -> list[str]:
    """Training-run columns (diagnostics and speed), in order."""
    return ["conflict_fraction", *[f"sign_agree_{t}" for t in [*tasks, "seg"]], "s_per_it"]


MIN_PAIRS = 3  # fewer seed pairs give no interval: a bootstrap of 1 or 2 values only repeats them


def paired_difference(diffs: Sequence[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-seed differences and its 95% percentile bootstrap interval (seeds resampled with
    replacement, a fixed numpy seed); the interval is NaN with fewer than `MIN_PAIRS` pairs."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    if d.size < MIN_PAIRS:
        return float(d.mean()), float("nan"), float("nan")
    means = d[np.random.default_rng(seed).integers(0, d.size, (resamples, d.size))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _paired(runs: Sequence[dict], reference: Sequence[dict], metric: str = "mean_macro_f1") -> list[float]:
    """Per seed present in both: test `metric` of the run minus that of the reference run."""
    ref = {r["seed"]: r["test"].get(metric, np.nan) for r in reference}
    return [r["test"].get(metric, np.nan) - ref[r["seed"]] for r in runs if r["seed"] in ref]


def summarize(results: Sequence[dict], reference: str = "equal") -> list[dict[str, Any]]:
    """Per strategy (in first-seen order): number of seeds, mean and sample standard deviation of each
    test score and run column, then the paired difference of mean test macro-F1 to `reference`
    (n pairs, mean, 95% bootstrap interval; blank for the reference itself)."""
    tasks = results[0]["tasks"]
    table = []
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        runs = [r for r in results if r["strategy"] == strategy]
        row: dict[str, Any] = {"strategy": strategy, "seeds": len(runs)}
        for name in metric_names(tasks) + run_names(tasks):
            values = np.array([r["test"].get(name, np.nan) if name in metric_names(tasks) else r.get(name, np.nan)
                               for r in runs], dtype=float)
            row[f"{name}_mean"] = float(values.mean())
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        diffs = [] if strategy == reference else _paired(runs, [r for r in results if r["strategy"] == reference])
        mean, low, high = paired_difference(diffs)
        row.update({"pairs": len(diffs), "delta_f1_mean": mean, "delta_f1_ci_low": low, "delta_f1_ci_high": high})
        table.append(row)
    return table


def _cell(row: dict[str, Any], name: str) -> str:
    """Mean ± std (s/it with 2 decimals, the rest with 3)."""
    digits = 2 if name == "s_per_it" else 3
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return f"{mean:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}")


def _delta_cell(row: dict[str, Any]) -> str:
    """Paired difference with its interval and n pairs; blank without pairs (the reference)."""
    if not row["pairs"]:
        return ""
    if np.isnan(row["delta_f1_ci_low"]):
        return f"{row['delta_f1_mean']:+.3f} (n={row['pairs']}, too few pairs for an interval)"
    return f"{row['delta_f1_mean']:+.3f} [{row['delta_f1_ci_low']:+.3f}, {row['delta_f1_ci_high']:+.3f}] " \
           f"(n={row['pairs']})"


def per_seed(results: Sequence[dict], reference: str = "equal") -> list[dict[str, Any]]:
    """Test mean macro-F1 seed by seed: one row per seed that has a `reference` run and another strategy's
    (the pairs behind the paired differences), strategies in first-seen order."""
    by_seed: dict[int, dict[str, float]] = {}
    for result in results:
        by_seed.setdefault(int(result["seed"]), {})[result["strategy"]] = float(result["test"]["mean_macro_f1"])
    return [{"seed": seed, **found} for seed, found in sorted(by_seed.items()) if reference in found and len(found) > 1]


def per_seed_lines(results: Sequence[dict], reference: str = "equal") -> list[str]:
    """`per_seed` as a markdown table: a column per strategy, each other strategy's difference to
    `reference` of the same seed in brackets; no lines without pairs."""
    rows = per_seed(results, reference)
    if not rows:
        return []
    others = [s for s in dict.fromkeys(r["strategy"] for r in results) if s != reference]
    lines = [f"| seed | {reference} | " + " | ".join(others) + " |", "|---:|---:|" + "---:|" * len(others)]
    for r in rows:
        cells = [f"{r[o]:.3f} ({r[o] - r[reference]:+.3f})" if o in r else "" for o in others]
        lines.append(f"| {r['seed']} | {r[reference]:.3f} | " + " | ".join(cells) + " |")
    return lines


def write_table(table: list[dict[str, Any]], tasks: Sequence[str], output: Path, results: Sequence[dict] = (),
                reference: str = "equal") -> None:
    """`ablation.csv` (every number) and `ablation.md` (mean ± std over seeds of the test scores, the
    paired difference to `reference`, then the run columns; below it, from `results`, the test mean
    macro-F1 seed by seed)."""
    with open(output / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    titles = [f"{t} {'F1' if m == 'macro_f1' else 'AUC'}" for t in tasks for m in ("macro_f1", "roc_auc")]
    titles += ["mean F1", "Dice", f"Δ mean F1 vs {reference} [95% CI]", "conflicting pairs"]
    titles += [f"sign agree {t}" for t in [*tasks, "seg"]] + ["s/it"]
    lines = ["| strategy | seeds | " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * len(titles)]
    for row in table:
        cells = [_cell(row, n) for n in metric_names(tasks)] + [_delta_cell(row)]
        cells += [_cell(row, n) for n in run_names(tasks)]
        lines.append(f"| {row['strategy']} | {row['seeds']} | " + " | ".join(cells) + " |")
    seeds = per_seed_lines(results, reference)
    if seeds:
        title = f"Test mean macro-F1 seed by seed (in brackets: minus `{reference}` of the same seed):"
        lines += ["", title, "", *seeds]
    (output / "ablation.md").write_text("\n".join(lines) + "\n")


def _plot_curves(results: Sequence[dict], ax: Any) -> None:
    """Validation mean macro-F1 against iterations: per strategy the mean over seeds, shaded from
    the lowest to the highest seed."""
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        curves = [np.array(r["curve"], dtype=float) for r in results if r["strategy"] == strategy and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x, ys = curves[0][:n, 0], np.stack([c[:n, 1] for c in curves])
        ax.plot(x, ys.mean(0), marker="o", markersize=3, label=f"{strategy} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.15)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("validation mean macro-F1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_differences(table: Sequence[dict[str, Any]], ax: Any, reference: str) -> None:
    """Paired test mean macro-F1 difference to `reference` per strategy, with its 95% interval."""
    rows = [r for r in table if r["pairs"]]
    y = np.arange(len(rows))
    mean = np.array([r["delta_f1_mean"] for r in rows], dtype=float)
    low = np.array([r["delta_f1_ci_low"] for r in rows], dtype=float)
    high = np.array([r["delta_f1_ci_high"] for r in rows], dtype=float)
    ax.errorbar(mean, y, xerr=np.nan_to_num([mean - low, high - mean]), fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [f"{r['strategy']} (n={r['pairs']}{'' if np.isfinite(lo) else ', no interval'})"
                      for r, lo in zip(rows, low)])
    ax.set_xlabel(f"test mean macro-F1 − {reference} (paired, 95% CI)")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))                      # tick labels that do not touch
    ax.grid(alpha=0.3)


def plot_results(results: Sequence[dict], table: Sequence[dict[str, Any]], path: Path,
                 reference: str = "equal") -> None:
    """Left: validation curves; right: paired test differences to `reference`."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    _plot_curves(results, left)
    _plot_differences(table, right, reference)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(strategies: Any = DEFAULT_STRATEGIES, seeds: Any = (0, 1, 2, 3, 4), epochs: int | None = None,
         iters_per_epoch: int | None = None, output: str = "eval/ablation", config_file: Any = DEFAULT_CONFIGS,
         diagnose_every: int = 10, threads: int | None = None, train: bool = True, table: bool = True,
         **overrides: Any) -> None:
    """Train and test every strategy with every seed, then write the table and the plot into `output`.

    Args:
        strategies: names from `scripts.mtl.STRATEGIES` (comma-separated or a list).
        seeds: one training run per seed and strategy (network initialisation, sampling, augmentation);
            the strategies of a seed see the same main batches (paired seeds).
        epochs, iters_per_epoch: training length (default: the configs'); validation after each epoch.
        output: folder of the runs and the results.
        config_file: training configs, merged in order (default train.yaml then demo.yaml); testing
            merges configs/evaluate.yaml after the first.
        diagnose_every: iterations between gradient-conflict measurements.
        threads: torch CPU threads (default: torch's); e.g. 1 to run one seed per core in separate
            processes (same `output`, `table=False`; then one call with `train=False` writes the table).
        train: False only reads the runs that have finished training (testing any not yet tested).
        table: False skips the table and plot (per-seed processes).
        overrides: any other config id -> value, e.g. dataset_dir, datalist.
    """
    names, seed_list = _as_list(strategies), [int(s) for s in _as_list(seeds)]
    train, table = _as_bool(train), _as_bool(table)
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**overrides, "diagnose_every": diagnose_every}
    overrides.update({k: v for k, v in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch)) if v is not None})
    runs = [(s, seed) for seed in seed_list for s in names]
    results, started = [], time.perf_counter()
    for i, (strategy, seed) in enumerate(runs, 1):
        run_dir = out / strategy / f"seed_{seed}"
        if not train and read_result(run_dir) is None:
            print(f"[ablation {i}/{len(runs)}] {strategy}, seed {seed}: not trained, left out", flush=True)
            continue
        print(f"[ablation {i}/{len(runs)}] {strategy}, seed {seed}", flush=True)
        result = train_one(strategy, seed, run_dir, _as_list(config_file), overrides)
        results.append(result)
        elapsed = time.perf_counter() - started
        print(f"[ablation {i}/{len(runs)}] {strategy}, seed {seed}: {result['s_per_it']:.2f} s/it, "
              f"test mean macro-F1 {result['test'].get('mean_macro_f1', float('nan')):.3f}; "
              f"{elapsed / 60:.1f} min so far", flush=True)
    if not table or not results:
        return
    rows = summarize(results)
    write_table(rows, results[0]["tasks"], out, results)
    plot_results(results, rows, out / "ablation_f1.png")
    print(f"[ablation] wrote {out / 'ablation.md'}, {out / 'ablation.csv'} and {out / 'ablation_f1.png'}", flush=True)


if __name__ == "__main__":
    run(main)
