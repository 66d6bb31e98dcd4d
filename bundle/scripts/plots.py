"""PNG figures of an evaluation: ROC curves, confusion matrices and reliability diagrams, one panel per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402


def plot_roc_curves(probs: np.ndarray, labels: np.ndarray, tasks: Sequence[str], path: str | Path) -> None:
    """ROC curve of class 1 for each task with both classes present; `probs [N,T,K]`, `labels [N,T]`."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 4), squeeze=False)
    for i, (task, ax) in enumerate(zip(tasks, axes[0])):
        keep = labels[:, i] >= 0
        y, p = labels[keep, i], probs[keep, i, -1]
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(y, p):.3f} (n={len(y)})")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "one class only", ha="center")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.set(title=task, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrices(task_reports: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Confusion matrix (rows true, columns predicted) of each task in a `classification_report` dict."""
    tasks = list(task_reports)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.6 * max(1, len(tasks)), 3.4), squeeze=False)
    for task, ax in zip(tasks, axes[0]):
        cm = np.asarray(task_reports[task]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set(title=task, xlabel="predicted", ylabel="true", xticks=range(len(cm)), yticks=range(len(cm)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability_diagrams(tables: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Reliability diagram of each task: accuracy against mean confidence per confidence bin (bars,
    with the case count above each), the diagonal of perfect calibration and the ECE in the title.
    `tables[task]["raw"]` (and `["calibrated"]` when temperatures apply) are `scripts.calibration.reliability`
    results; the calibrated bins are drawn as points."""
    tasks = list(tables)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 4), squeeze=False)
    for task, ax in zip(tasks, axes[0]):
        raw = tables[task]["raw"]
        title = f"{task}: ECE {raw['ece']:.3f}"
        for b in raw["bins"]:
            if b["count"]:
                width = b["upper"] - b["lower"]
                ax.bar(b["lower"], b["accuracy"], width=width, align="edge", color="tab:blue", alpha=0.6,
                       edgecolor="black", lw=0.5)
                ax.text(b["lower"] + width / 2, b["accuracy"] + 0.02, str(b["count"]), ha="center", fontsize=7)
        ax.bar([], [], color="tab:blue", alpha=0.6, label="accuracy per bin (count above)")
        cal = tables[task].get("calibrated")
        if cal is not None:
            pts = [(b["confidence"], b["accuracy"]) for b in cal["bins"] if b["count"]]
            ax.plot(*zip(*pts), "o", color="tab:orange", label="temperature-scaled (at mean confidence)")
            title += f" (scaled {cal['ece']:.3f})"
        ax.legend(loc="upper left", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.set(title=title, xlabel=f"confidence (n={raw['n']}, {len(raw['bins'])} bins)", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1.08))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
