"""Strict JSON: the bundle never writes ``NaN`` or ``Infinity`` (which are not JSON, and which many readers
refuse). A number that is not finite is written as ``null``, and the file's ``null_reasons`` says why."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

# why a score is not a number, by its key (the last part of its path); others get the generic reason
KNOWN_REASONS = {
    "roc_auc": "undefined: these cases hold one class only",
    "dice": "no case with a tumor mask",
    "mean_macro_f1": "no task has a labelled case",
    "ece": "no labelled case",
    "sensitivity": "undefined: no case of the positive class",
    "specificity": "undefined: no case of the negative class",
}
GENERIC = "not a finite number"


def finite(obj: Any, reasons: dict[str, str], where: str = "") -> Any:
    """`obj` with every non-finite number replaced by None; each replaced path (``a.b.0``) -> its reason
    in `reasons`. NumPy scalars and arrays become plain Python values."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        key = where.rsplit(".", 1)[-1]
        reasons[where] = f"{KNOWN_REASONS.get(key, GENERIC)} ({obj})"
        return None
    if isinstance(obj, Mapping):
        return {str(k): finite(v, reasons, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, reasons, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]
    return obj


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text of `obj` without NaN or Infinity: such numbers become null, and a dict gets a
    ``null_reasons`` entry {path: why} listing them."""
    reasons: dict[str, str] = {}
    clean = finite(obj, reasons)
    if reasons and isinstance(clean, dict):
        clean["null_reasons"] = reasons
    return json.dumps(clean, indent=indent, allow_nan=False)
