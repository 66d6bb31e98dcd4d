"""Ablation of the multi-task strategies: train each strategy with each seed through the bundle's
training configs (same data, network, optimizer, iterations), then write one table and one plot.

Run from the bundle folder, e.g.:

    python -m scripts.ablation --strategies igreg,equal,pcgrad --seeds 0,1 --epochs 4 --iters_per_epoch 25

Each run goes to `<output>/<strategy>/seed_<seed>/` (`eval/`: validation and gradient-conflict CSVs,
TensorBoard; `models/`; `result.json` once it has finished). A finished run is not run again and an
interrupted one continues from its training state, so the command can simply be started again.
Any other keyword (`--dataset_dir`, `--datalist`, `--val_interval`, ...) overrides the configs.

Outputs in `<output>`: `ablation.csv` and `ablation.md` (per strategy: mean and standard deviation
over seeds of the final validation scores, the mean fraction of conflicting task-gradient pairs and
the seconds per training step) and `ablation_f1.png` (validation mean macro-F1 against iterations).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import fire
import matplotlib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism

from scripts.data import ensure_demo_cohort
from scripts.strategies import MTLStrategy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
DEFAULT_STRATEGIES = ("igreg", "igreg_no_dpa", "igreg_no_stdgp", "equal", "uncertainty", "pcgrad", "cagrad")
DEFAULT_CONFIGS = (str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "demo.yaml"))


def _as_list(value: Any) -> list:
    """A comma-separated string, a single value or a sequence, as a list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, Iterable) else [value]


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


def train_one(strategy: str, seed: int, run_dir: Path, config_file: Sequence[str], overrides: dict) -> dict:
    """Train one strategy with one seed into `run_dir` and return its `result.json` content."""
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    eval_dir = run_dir / "eval"
    wf = ConfigWorkflow(config_file=list(config_file), workflow_type="train", run_id="training",
                        bundle_root=str(BUNDLE), **{**overrides, "mtl_strategy": strategy, "seed": seed,
                                                    "output_dir": str(eval_dir), "ckpt_dir": str(run_dir / "models")})
    wf.initialize()
    parser = wf.parser
    dataset_dir = parser.get_parsed_content("dataset_dir")
    if os.path.abspath(dataset_dir) == os.path.abspath(parser.get_parsed_content("demo_dir")):
        ensure_demo_cohort(dataset_dir)
    set_determinism(seed=seed)  # the network is built now, before the `training` list seeds the rest
    trainer = parser.get_parsed_content("train#trainer")
    timer = StepTimer(trainer.strategy)
    start = time.perf_counter()
    wf.run()
    wf.finalize()
    iters = int(parser.get_parsed_content("iters_per_epoch"))
    validation = _read_csv(eval_dir / "validation_metrics.csv", "epoch")
    conflicts = [r["conflict_fraction"] for r in _read_csv(eval_dir / "gradient_conflicts.csv", "iteration")]
    result = {
        "strategy": strategy, "seed": seed, "iterations": trainer.state.iteration,
        "tasks": list(parser.get_parsed_content("tasks")),
        "s_per_it": timer.seconds / max(timer.steps, 1), "cpu_s_per_it": timer.cpu_seconds / max(timer.steps, 1),
        "wall_s": time.perf_counter() - start,
        "conflict_fraction": float(np.nanmean(conflicts)) if conflicts else float("nan"),
        "final": validation[-1] if validation else {},
        "curve": [[int(r["epoch"]) * iters, r.get("mean_macro_f1", float("nan"))] for r in validation],
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def metric_names(tasks: Sequence[str]) -> list[str]:
    """Table columns, in order."""
    per_task = [f"{t}_{m}" for t in tasks for m in ("macro_f1", "roc_auc")]
    return per_task + ["mean_macro_f1", "dice", "conflict_fraction", "s_per_it"]


def summarize(results: Sequence[dict]) -> list[dict[str, Any]]:
    """Per strategy (in first-seen order): number of seeds, then mean and sample standard deviation of each metric."""
    tasks = results[0]["tasks"]
    table = []
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        runs = [r for r in results if r["strategy"] == strategy]
        row: dict[str, Any] = {"strategy": strategy, "seeds": len(runs)}
        for name in metric_names(tasks):
            values = np.array([r[name] if name in ("conflict_fraction", "s_per_it") else r["final"].get(name, np.nan)
                               for r in runs], dtype=float)
            row[f"{name}_mean"] = float(values.mean())
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        table.append(row)
    return table


def write_table(table: list[dict[str, Any]], tasks: Sequence[str], output: Path) -> None:
    """`ablation.csv` (every number) and `ablation.md` (mean ± std, 3 decimals; s/it with 2)."""
    with open(output / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    names = metric_names(tasks)
    titles = [f"{t} {'F1' if m == 'macro_f1' else 'AUC'}" for t in tasks for m in ("macro_f1", "roc_auc")]
    titles += ["mean F1", "Dice", "conflicting pairs", "s/it"]
    lines = ["| strategy | seeds | " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * len(titles)]
    for row in table:
        cells = []
        for name in names:
            digits = 2 if name == "s_per_it" else 3
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            cells.append(f"{mean:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}"))
        lines.append(f"| {row['strategy']} | {row['seeds']} | " + " | ".join(cells) + " |")
    (output / "ablation.md").write_text("\n".join(lines) + "\n")


def plot_curves(results: Sequence[dict], path: Path) -> None:
    """Validation mean macro-F1 against iterations: per strategy the mean over seeds, shaded from
    the lowest to the highest seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(strategies: Any = DEFAULT_STRATEGIES, seeds: Any = (0, 1), epochs: int | None = None,
         iters_per_epoch: int | None = None, output: str = "eval/ablation", config_file: Any = DEFAULT_CONFIGS,
         diagnose_every: int = 10, threads: int | None = None, **overrides: Any) -> None:
    """Train every strategy with every seed, then write the table and the plot into `output`.

    Args:
        strategies: names from `scripts.strategies.STRATEGIES` (comma-separated or a list).
        seeds: one training run per seed and strategy (network initialisation, sampling, augmentation).
        epochs, iters_per_epoch: training length (default: the configs'); validation after each epoch.
        output: folder of the runs and the results.
        config_file: bundle configs, merged in order (default train.yaml then demo.yaml).
        diagnose_every: iterations between gradient-conflict measurements.
        threads: torch CPU threads (default: torch's); e.g. 1 to run two ablations side by side on two
            cores (each with its own strategies, same `output`; a last call with all of them writes the table).
        overrides: any other config id -> value, e.g. dataset_dir, datalist.
    """
    names, seed_list = _as_list(strategies), [int(s) for s in _as_list(seeds)]
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**overrides, "diagnose_every": diagnose_every}
    overrides.update({k: v for k, v in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch)) if v is not None})
    runs = [(s, seed) for s in names for seed in seed_list]
    results, started = [], time.perf_counter()
    for i, (strategy, seed) in enumerate(runs, 1):
        print(f"[ablation {i}/{len(runs)}] {strategy}, seed {seed}", flush=True)
        result = train_one(strategy, seed, out / strategy / f"seed_{seed}", _as_list(config_file), overrides)
        results.append(result)
        elapsed = time.perf_counter() - started
        print(f"[ablation {i}/{len(runs)}] {strategy}, seed {seed}: {result['s_per_it']:.2f} s/it, "
              f"mean macro-F1 {result['final'].get('mean_macro_f1', float('nan')):.3f}; "
              f"{elapsed / 60:.1f} min so far", flush=True)
    write_table(summarize(results), results[0]["tasks"], out)
    plot_curves(results, out / "ablation_f1.png")
    print(f"[ablation] wrote {out / 'ablation.md'}, {out / 'ablation.csv'} and {out / 'ablation_f1.png'}", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
