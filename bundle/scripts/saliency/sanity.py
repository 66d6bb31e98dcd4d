"""Sanity measures of saliency maps: how much of a map's mass lies in the tumour against the tumour's
share of the brain, and how much a map changes when the model's weights are randomised (Adebayo et
al., 2018, "Sanity checks for saliency maps")."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr

# cascading randomisation of the classification path, from the output down: each stage re-draws the
# parameters of the submodules whose names start with one of these prefixes ("all": every parameter)
CASCADE: dict[str, list[str] | None] = {
    "heads": ["classifier.heads"],
    "branch": ["classifier"],
    "neck": ["classifier", "neck"],
    "all": None,
}


def mass_share(saliency: np.ndarray, tumour: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """(share of the map's mass inside the tumour, the tumour's share of the brain's voxels), both over
    the brain only; the mass share is NaN for a map with no mass in the brain."""
    s = np.clip(np.asarray(saliency, np.float64), 0, None)[brain > 0]
    t = np.asarray(tumour)[brain > 0] > 0
    total = s.sum()
    volume = float(t.mean()) if t.size else math.nan
    return (float(s[t].sum() / total) if total > 0 else math.nan), volume


def rank_correlation(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> float:
    """Spearman's rank correlation of two maps over the brain's voxels (NaN when one map is constant)."""
    x, y = np.asarray(a)[brain > 0], np.asarray(b)[brain > 0]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y)[0])
