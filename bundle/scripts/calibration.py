"""Calibration of the classification heads: expected calibration error (ECE), reliability bins and
per-task temperature scaling (Guo et al., 2017), stored in model.pt beside the settings record.

ECE here: each case's confidence is its top-class probability and it is correct when that class is
the true one; the confidences fall into `bins` equal-width bins of [0, 1] (default 10; bin `b` is
`[b/bins, (b+1)/bins)`, the last one closed), and ECE = sum over bins of (cases in the bin / all
cases) * |accuracy in the bin - mean confidence in the bin|. Cases without a label (-1) are left out.
With two classes the confidence is at least 0.5, so the bins below it stay empty.

Temperature scaling divides a task's logits by one scalar T > 0 before the softmax: the predicted
class, hence accuracy, F1 and (two classes) ROC AUC, is unchanged; only the probabilities move. T is
fitted on the validation split (never on the test split), by minimising the negative log-likelihood.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scripts.checkpoint import CheckpointError, atomic_save, plain, safe_load

CALIBRATION_KEY = "igreg_calibration"  # model.pt: torch.load(path, weights_only=True)._metadata[CALIBRATION_KEY]
DEFAULT_BINS = 10
MIN_CASES = 10  # labelled validation cases a task needs before its temperature is fitted
T_RANGE = (0.05, 20.0)  # fitted temperatures are clipped to this range (separable data drives T to 0)
logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Temperature fitting asked for where it would be wrong (e.g. on the test split)."""


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """ECE and the per-bin table of one task: `probs [N, K]` class probabilities, `labels [N]` (-1: no label).

    Returns `{"ece", "n", "bins": [{"lower", "upper", "count", "confidence", "accuracy"}]}`; an
    empty bin has `None` confidence and accuracy; ECE is NaN without labelled cases."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    keep = labels >= 0
    conf, correct = probs[keep].max(1), (probs[keep].argmax(1) == labels[keep]).astype(np.float64)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else None
        mean_conf = float(conf[inside].mean()) if count else None
        if count:
            ece += count / len(conf) * abs(acc - mean_conf)
        table.append({"lower": b / bins, "upper": (b + 1) / bins, "count": count, "confidence": mean_conf,
                      "accuracy": acc})
    return {"ece": float(ece) if len(conf) else float("nan"), "n": int(len(conf)), "bins": table}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE of one task (see `reliability`)."""
    return reliability(probs, labels, bins)["ece"]


def probs_to_logits(probs: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Log-probabilities as logits: log softmax(z) = z - logsumexp(z) differs from the logits z by a
    constant per case, which the softmax ignores, so log p / T gives exactly softmax(z / T). Zeros
    (float32 underflow) are clamped to the smallest positive float32 first."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    return p.clamp_min(torch.finfo(torch.float32).tiny).log()


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities `[..., K]` as the network would give them with its logits divided by T."""
    return (probs_to_logits(probs) / temperature).softmax(-1).numpy()


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels [N]` under softmax(logits / T)."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) for `logits [N, K]`, `labels [N]`: L-BFGS
    on log T from T = 1, clipped to `T_RANGE`."""
    logits, labels = torch.as_tensor(logits).double().detach(), torch.as_tensor(labels).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if math.isfinite(t) and not T_RANGE[0] <= t <= T_RANGE[1]:
        logger.warning(f"calibration: fitted temperature {t:.3g} clipped to the range {T_RANGE}")
    return float(np.clip(t, *T_RANGE)) if math.isfinite(t) else float("nan")


def why_not_fit(labels: np.ndarray, min_cases: int = MIN_CASES) -> str | None:
    """Why a task's labelled cases (`labels [N]`, -1 missing) cannot give a temperature, or None."""
    y = labels[labels >= 0]
    if len(y) < min_cases:
        return f"{len(y)} labelled cases (at least {min_cases} needed)"
    if len(np.unique(y)) < 2:
        return f"one class only among its {len(y)} labelled cases"
    return None


def fit_temperatures(probs: np.ndarray, labels: np.ndarray, tasks: Sequence[str],
                     min_cases: int = MIN_CASES) -> tuple[dict[str, float], dict[str, str]]:
    """Per-task temperatures from the gathered `probs [N, T, K]` and `labels [N, T]` (-1: missing);
    returns ({task: T}, {task: why it was skipped}). Each skipped task is logged."""
    temperatures, skipped = {}, {}
    for i, task in enumerate(tasks):
        y = labels[:, i]
        problem = why_not_fit(y, min_cases)
        if problem:
            skipped[task] = problem
            logger.warning(f"calibration: no temperature for {task}: {problem}; its probabilities stay uncalibrated")
            continue
        keep = y >= 0
        t = fit_temperature(probs_to_logits(probs[keep, i]), torch.as_tensor(y[keep]))
        if math.isfinite(t):
            temperatures[task] = t
        else:
            skipped[task] = "the fit gave no finite temperature"
            logger.warning(f"calibration: no temperature for {task}: the fit gave no finite temperature")
    return temperatures, skipped


def read_calibration(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The calibration record of a model.pt (see `store_calibration`), None when it has none or there is no file."""
    if not path or not os.path.isfile(path):
        return None
    found = getattr(safe_load(path), "_metadata", None)
    record = found.get(CALIBRATION_KEY) if isinstance(found, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def temperatures_of(record: Mapping[str, Any] | None, source: str | os.PathLike = "model.pt"
                    ) -> dict[str, float] | None:
    """{task: T} of a calibration record (`read_calibration`), None when it holds none.

    Every temperature is checked as it is read: a number (not text or a bool), finite, and within
    `T_RANGE`, the range the fit gives. Anything else (T = -1 would invert every probability, T = inf
    flatten them to 0.5) is refused with a :class:`CalibrationError` naming `source` (the checkpoint)."""
    temps = record.get("temperature") if record else None
    if temps is None or (isinstance(temps, Mapping) and not temps):
        return None
    where = f"checkpoint {os.fspath(source)}"
    if not isinstance(temps, Mapping):
        raise CalibrationError(f"{where}: its calibration record's 'temperature' must map tasks to numbers, got "
                               f"{type(temps).__name__}; refit with evaluate.yaml --calibrate true")
    out = {}
    for task, value in temps.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not T_RANGE[0] <= value <= T_RANGE[1]:
            raise CalibrationError(f"{where}: calibration temperature of task {task!r} is {value!r}, not a finite "
                                   f"number in [{T_RANGE[0]}, {T_RANGE[1]}] (the range the fit gives); refit with "
                                   "evaluate.yaml --calibrate true, or use a checkpoint without calibration")
        out[str(task)] = float(value)
    return out


def read_temperatures(path: str | os.PathLike | None) -> dict[str, float] | None:
    """{task: T} stored in a model.pt, checked (`temperatures_of`); None without calibration (inference
    then reports raw probabilities)."""
    return temperatures_of(read_calibration(path), path or "model.pt")


def store_calibration(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write `record` into the model.pt at `path` as `_metadata[CALIBRATION_KEY]`: the weights and the
    settings record are kept as they are (strict loading and the settings check still pass); the file
    is replaced atomically, so a failed write leaves the previous file."""
    state = safe_load(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{os.fspath(path)!r} is not a state_dict of tensors: no calibration stored")
    if getattr(state, "_metadata", None) is None:
        metadata = OrderedDict()
        state = OrderedDict(state)
        state._metadata = metadata  # type: ignore[attr-defined]
    state._metadata[CALIBRATION_KEY] = plain(record)  # type: ignore[attr-defined]
    atomic_save(state, path)


def check_calibrate(calibrate: bool, split: str, ckpt_path: str | None) -> None:
    """Refuse `--calibrate true` on any split but validation (the test split's scores would be fitted
    to), or without a checkpoint to store the temperatures in."""
    if not calibrate:
        return
    if split != "validation":
        why = ("fitting on the test split would leak it into the test scores" if split == "testing"
               else "they must be fitted on held-out validation cases")
        raise CalibrationError(f"--calibrate true fits temperatures on the validation split only, not on "
                               f"val_split {split!r}: {why}")
    if not ckpt_path:
        raise CalibrationError("--calibrate true needs the checkpoint (load_pretrain true) to store the temperatures")


class Calibration:
    """The calibration part of an evaluation report: ECE and reliability bins per task, the stored
    temperatures' ECE, and with `fit` the temperatures fitted here and written into `ckpt_path`."""

    def __init__(self, ckpt_path: str | None = None, split: str = "validation", fit: bool = False,
                 bins: int = DEFAULT_BINS, min_cases: int = MIN_CASES) -> None:
        check_calibrate(fit, split, ckpt_path)
        self.ckpt_path, self.split, self.fit, self.bins, self.min_cases = ckpt_path, split, fit, int(bins), min_cases

    def update_report(self, report: dict[str, Any], probs: np.ndarray, labels: np.ndarray,
                      tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Add `ece` and `reliability` (raw probabilities) to each task of `report["tasks"]`, with
        `ece_calibrated` when temperatures apply, and `report["calibration"]` (temperatures, ECE and
        NLL before/after); returns, per task, the reliability tables to plot (`raw`, and `calibrated`
        when temperatures apply)."""
        summary: dict[str, Any] = {"bins": self.bins, "note": "each task's `ece` is of the network's probabilities; "
                                   "`ece_calibrated` (`ece_after`) of them with the temperatures below"}
        if self.fit:
            temperatures, skipped = fit_temperatures(probs, labels, tasks, self.min_cases)
            summary.update(fitted_on=self.split, skipped=skipped)
        else:
            stored = read_calibration(self.ckpt_path)  # model.pt is read once, and not at all when fitting
            temperatures = temperatures_of(stored, self.ckpt_path or "model.pt") or {}
            if temperatures:
                summary["stored"] = stored
        tables: dict[str, dict[str, Any]] = {}
        nlls: dict[str, tuple[float, float]] = {}
        for i, task in enumerate(tasks):
            if task not in report["tasks"]:
                continue
            raw = reliability(probs[:, i], labels[:, i], self.bins)
            tables[task] = {"raw": raw}
            report["tasks"][task].update(ece=raw["ece"], reliability=raw["bins"])
            if task in temperatures:
                cal = reliability(apply_temperature(probs[:, i], temperatures[task]), labels[:, i], self.bins)
                tables[task]["calibrated"] = cal
                report["tasks"][task]["ece_calibrated"] = cal["ece"]
                keep = labels[:, i] >= 0
                logits, y = probs_to_logits(probs[keep, i]), torch.as_tensor(labels[keep, i])
                nlls[task] = (nll(logits, y), nll(logits, y, temperatures[task]))
        summary["temperature"] = {t: temperatures[t] for t in tasks if t in temperatures}
        summary["ece_before"] = {t: r["raw"]["ece"] for t, r in tables.items()}
        summary["ece_after"] = {t: r["calibrated"]["ece"] for t, r in tables.items() if "calibrated" in r}
        summary["nll_before"] = {t: v[0] for t, v in nlls.items()}
        summary["nll_after"] = {t: v[1] for t, v in nlls.items()}
        report["calibration"] = summary
        if self.fit:
            self._store(summary)
        return tables

    def _store(self, summary: Mapping[str, Any]) -> None:
        if not summary["temperature"]:
            logger.warning(f"calibration: no task could be calibrated; {self.ckpt_path} is left unchanged")
            return
        record = {k: summary[k] for k in ("temperature", "bins", "ece_before", "ece_after", "nll_before", "nll_after",
                                          "skipped")}
        store_calibration(self.ckpt_path, {**record, "split": self.split})
        logger.info(f"calibration: temperatures {summary['temperature']} stored in {Path(self.ckpt_path)}")
