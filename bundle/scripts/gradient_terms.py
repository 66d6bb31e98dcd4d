"""Where the trunk's update comes from: a figure and a table of the diagnostics' per-term columns
(`scripts.diagnostics`: each term's gradient norm on the shared trunk under its weight, its sign agreement
with the applied update, and the log-variances), mean over the seeds of each group of runs.

    python -m scripts.gradient_terms --runs "eval/regime/select/lr1e-3_ss1/igreg,eval/regime/select/lr1e-3_ss1/equal" \\
        --output docs/gradient_terms

Each entry of `runs` is a folder of `seed_<k>` runs (`scripts.ablation`'s layout) and names one group by its
last two folders. Writes `<output>.png` (norms and sign agreement over training per term and group; the
log-variances of groups that have them) and `<output>.csv` (per group and term: mean over the run and seeds).
For `equal` the objective's terms are its task losses with weight 1, so runs that predate the per-term
columns are read from the per-task ones (`norm_<task>`, `sign_agree_<task>`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from scripts.ablation import _as_list, _read_csv
from scripts.cli import run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TERM_ORDER = ("1p19q", "idh", "grade", "seg", "margin", "heterogeneity", "align", "feature_reg")


def _columns(row: dict[str, float]) -> dict[str, float]:
    """The per-term columns of a diagnostics row, from the per-task ones where a run has none (equal)."""
    if any(k.startswith("term_norm_") for k in row):
        return row
    out = dict(row)
    for key, value in row.items():
        if key.startswith("norm_"):
            out[f"term_norm_{key[5:]}"] = value
        elif key.startswith("sign_agree_"):
            out[f"term_sign_{key[11:]}"] = value
    return out


def load_group(folder: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Iterations and, per column, the values [seeds, iterations] of the group's runs (cut to the shortest)."""
    runs = [[_columns(r) for r in _read_csv(d / "eval" / "gradient_conflicts.csv", "iteration")]
            for d in sorted(folder.glob("seed_*"))]
    runs = [r for r in runs if r]
    if not runs:
        raise FileNotFoundError(f"no gradient_conflicts.csv under {folder}/seed_*/eval")
    n = min(len(r) for r in runs)
    keys = [k for k in runs[0][0] if all(k in r[0] for r in runs)]
    values = {k: np.array([[row[k] for row in r[:n]] for r in runs], dtype=float) for k in keys}
    return values.pop("iteration")[0], values


def _terms(values: dict[str, np.ndarray]) -> list[str]:
    present = {k[len("term_norm_"):] for k in values if k.startswith("term_norm_")}
    return [t for t in TERM_ORDER if t in present] + sorted(present - set(TERM_ORDER))


def summary(groups: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]) -> list[dict[str, Any]]:
    """Per group and term: seeds, mean gradient norm, mean sign agreement (over the run, then the seeds)."""
    rows = []
    for name, (_, values) in groups.items():
        for term in _terms(values):
            norm, sign = values[f"term_norm_{term}"], values[f"term_sign_{term}"]
            rows.append({"group": name, "term": term, "seeds": norm.shape[0],
                         "grad_norm": float(np.nanmean(norm)), "sign_agree": float(np.nanmean(sign))})
    return rows


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Running mean of `y` over `window` points (fewer at the ends)."""
    window = min(window, len(y))
    if window <= 1:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")


def plot(groups: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]], path: Path, window: int = 5) -> None:
    """Left: gradient norm per term (log scale); middle: sign agreement; right: log-variances; each the mean
    over seeds, then a running mean over `window` measurements."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    styles = ["-", "--", ":", "-."]
    colours = dict(zip(TERM_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for g, (name, (x, values)) in enumerate(groups.items()):
        for term in _terms(values):
            kw = dict(ls=styles[g % len(styles)], color=colours.get(term), lw=1.4)
            axes[0].plot(x, smooth(np.nanmean(values[f"term_norm_{term}"], 0), window), label=f"{name}: {term}", **kw)
            axes[1].plot(x, smooth(np.nanmean(values[f"term_sign_{term}"], 0), window), **kw)
        for key in sorted(k for k in values if k.startswith("log_var_")):
            axes[2].plot(x, np.nanmean(values[key], 0), ls=styles[g % len(styles)], label=f"{name}: {key[8:]}")
    axes[0].set(yscale="log", xlabel="iteration", ylabel="|gradient| on the shared trunk (weighted term)")
    axes[1].axhline(0.5, color="grey", lw=1)
    axes[1].set(xlabel="iteration", ylabel="sign agreement with the applied update")
    axes[2].set(xlabel="iteration", ylabel="log-variance s (weight exp(-s))")
    axes[0].legend(fontsize=6, ncol=2)
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(runs: Any, output: str = "gradient_terms", window: int = 5) -> None:
    """Figure and table of the per-term diagnostics for each folder of seed runs in `runs` (comma-separated);
    `window`: measurements in the figure's running mean."""
    groups = {}
    for folder in _as_list(runs):
        p = Path(folder)
        groups[f"{p.parent.name}/{p.name}"] = load_group(p)
    rows = summary(groups)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{output}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(groups, Path(f"{output}.png"), window)
    print("| group | term | seeds | mean |gradient| on the trunk | mean sign agreement |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['group']} | {r['term']} | {r['seeds']} | {r['grad_norm']:.3g} | {r['sign_agree']:.3f} |")


if __name__ == "__main__":
    run(main)
