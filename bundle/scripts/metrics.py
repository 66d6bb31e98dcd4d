"""Validation metrics of the multi-task model: per-task classification scores and the tumor Dice.

`MultiTaskMetric` is an Ignite metric that accumulates the evaluator's outputs (the tumor Dice of
each case by MONAI's `compute_dice`), gathers them across ranks (MONAI's `evenly_divisible_all_gather`)
and reports one key score (mean Dice + mean macro-F1, the model-selection rule of
the reference) plus a flat dict of scalars and a full report with confusion matrices.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics import compute_dice
from monai.utils import convert_to_tensor, evenly_divisible_all_gather
from sklearn import metrics as skm


def classification_report(y_true: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Scores of one task from true classes `[N]` and class probabilities `[N, K]`.

    Sensitivity and specificity are those of class 1 (binary) or macro one-vs-rest (K > 2);
    ROC-AUC is NaN when the cases hold a single class; then the macro scores average the classes that
    occur (in the truth or the predictions), and a ``note`` says so.
    """
    k = prob.shape[1]
    y_pred = prob.argmax(1)
    labels = list(range(k))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    tp = np.diag(cm).astype(float)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    if k == 2:
        sensitivity, specificity = sens[1], spec[1]
        auc = skm.roc_auc_score(y_true, prob[:, 1]) if len(np.unique(y_true)) == 2 else float("nan")
    else:
        sensitivity, specificity = np.nanmean(sens), np.nanmean(spec)
        present = len(np.unique(y_true)) == k
        auc = skm.roc_auc_score(y_true, prob, multi_class="ovr", labels=labels) if present else float("nan")
    present = sorted(set(np.unique(y_true).tolist()) | set(np.unique(y_pred).tolist()))
    one_class = len(np.unique(y_true)) == 1
    # one class in the truth: macro scores over the classes that occur (an absent class's F1 of 0 would halve it)
    kw = {"labels": present if one_class else labels, "average": "macro", "zero_division": 0}
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, **kw)),
        "precision": float(skm.precision_score(y_true, y_pred, **kw)),
        "recall": float(skm.recall_score(y_true, y_pred, **kw)),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "roc_auc": float(auc),
        "confusion_matrix": cm.tolist(),
        **({"note": f"one class only ({int(y_true[0])}) among these cases: macro scores over the classes that "
                    "occur; ROC AUC undefined"} if one_class else {}),
    }


def _plain(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU without MONAI's metadata: the rows of a batch's MetaTensor, gathered across ranks,
    could not be sliced apart again."""
    return convert_to_tensor(t.detach(), track_meta=False).cpu()


def default_output_transform(output: dict) -> tuple[dict, dict]:
    """Evaluator output -> (predictions dict, targets dict)."""
    return output["pred"], output["label"]


class MultiTaskMetric(Metric):
    """Accumulates per-task probabilities and per-case Dice; computes the selection score.

    `compute()` returns mean Dice + mean macro-F1 over tasks (the key metric); on completion the
    engine also gets `state.metrics[f"{task}_{score}"]`, `state.metrics["dice"]` and the full report
    in `state.metric_details["report"]`, with the gathered `probs [N, T, K]` and `labels [N, T]`.
    """

    def __init__(self, tasks: Sequence[str], output_transform: Callable = default_output_transform,
                 device: str | torch.device = "cpu") -> None:
        self.tasks = list(tasks)
        self.report: dict[str, Any] = {}
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._dice: list[torch.Tensor] = []

    def update(self, output: tuple[dict, dict]) -> None:
        pred, target = output
        self._probs.append(_plain(torch.stack([pred[t].float().softmax(1) for t in self.tasks], 1)))
        self._labels.append(_plain(target["label"]))
        has_seg = target["has_seg"].bool()
        if has_seg.any():
            mask = pred["seg"].argmax(1, keepdim=True)[has_seg]
            # one Dice per case; ignore_empty=False: 1 when both masks are empty, 0 for a mask without tumor
            dice = compute_dice(mask, target["seg"][has_seg] > 0.5, include_background=True, ignore_empty=False)
            self._dice.append(_plain(dice[:, 0]))

    def compute(self) -> float:
        t_count = len(self.tasks)  # every rank gathers, also one whose shard has no case (or no mask)
        gather = evenly_divisible_all_gather  # shards of different lengths, concatenated in rank order
        probs = gather(torch.cat(self._probs).to(self._device) if self._probs else torch.zeros(0, t_count, 2))
        labels = gather(torch.cat(self._labels).to(self._device) if self._labels
                        else torch.zeros(0, t_count, dtype=torch.long))
        dice = gather(torch.cat(self._dice).to(self._device) if self._dice else torch.zeros(0))
        probs, labels = probs.cpu().numpy(), labels.cpu().numpy()
        self.gathered = {"probs": probs, "labels": labels}
        tasks = {}
        for i, task in enumerate(self.tasks):
            keep = labels[:, i] >= 0
            if keep.any():
                tasks[task] = classification_report(labels[keep, i].astype(int), probs[keep, i])
        f1s = [r["macro_f1"] for r in tasks.values()]
        mean_dice = float(dice.mean()) if dice.numel() else float("nan")
        mean_f1 = float(np.mean(f1s)) if f1s else float("nan")
        score = np.nansum([mean_dice, mean_f1]) if f1s or dice.numel() else 0.0
        self.report = {"tasks": tasks, "dice": mean_dice, "dice_cases": int(dice.numel()),
                       "mean_macro_f1": mean_f1, "score": float(score)}
        return float(score)

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        flat = {"dice": self.report["dice"], "mean_macro_f1": self.report["mean_macro_f1"]}
        for task, r in self.report["tasks"].items():
            flat.update({f"{task}_{k}": v for k, v in r.items() if k not in ("confusion_matrix", "n", "note")})
        engine.state.metrics.update(flat)
        engine.state.metric_details.update(report=self.report, **self.gathered)
