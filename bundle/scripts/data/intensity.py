"""What the network sees of a scan's intensities: its background level, its outliers and its brain.

One definition serves the preprocessing chain (:class:`scripts.data.transforms.RobustIntensityd`,
:class:`scripts.data.transforms.BrainZScored`) and the per-case check (:mod:`scripts.data.validate`),
so that the check judges the values the network will get.

- **Background.** The most common value of the volume's six faces, when it fills more than half
  of them (a constant fill such as -1000), is moved to 0. A volume whose faces are mostly 0 is left
  as it is.
- **Outliers.** Values farther than ``OUTLIER_WIDEN`` times the 0.1-99.9 percentile range of the
  non-zero voxels beyond that range (e.g. one voxel of 1e7 in a scan of 0-12000) are clipped to the
  bound. Clean scans lie well inside (BraTS 2021 and the demo cohort: within 0.44 ranges), so they
  are left exactly as they are.
- **Brain.** The voxels of the T1C above ``BRAIN_REL_TOL`` of its maximum.
"""
from __future__ import annotations

import numpy as np

OUTLIER_PERCENTILES = (0.1, 99.9)
OUTLIER_WIDEN = 5.0  # bounds: the percentile range widened by this many ranges on each side
BRAIN_REL_TOL = 1e-6  # brain: T1C above this share of its maximum
MIN_OUTLIER_VOXELS = 1000  # fewer non-zero voxels than this: no percentile is trusted, nothing is clipped


def background_value(volume: np.ndarray) -> float:
    """The constant that fills most of the faces of a 3D ``volume``, or 0.0 when none does."""
    v = np.asarray(volume)
    faces = np.concatenate([v[0].ravel(), v[-1].ravel(), v[:, 0].ravel(), v[:, -1].ravel(),
                            v[:, :, 0].ravel(), v[:, :, -1].ravel()])
    values, counts = np.unique(faces, return_counts=True)
    top = int(counts.argmax())
    return float(values[top]) if counts[top] > faces.size / 2 else 0.0


def outlier_bounds(volume: np.ndarray) -> tuple[float, float] | None:
    """(low, high) beyond which a voxel of ``volume`` is an outlier; None with too few non-zero voxels."""
    values = np.asarray(volume)[np.asarray(volume) != 0]
    if values.size < MIN_OUTLIER_VOXELS:
        return None
    low, high = (float(p) for p in np.percentile(values.astype(np.float64), OUTLIER_PERCENTILES))
    spread = (high - low) or abs(high)  # one value only: its own size
    return low - OUTLIER_WIDEN * spread, high + OUTLIER_WIDEN * spread


def robust_intensity(volume: np.ndarray) -> np.ndarray:
    """``volume`` (float32) with its background moved to 0 and its outliers clipped; the same
    array, untouched, when there is nothing to change."""
    out = volume
    background = background_value(out)
    if background != 0.0:
        out = out - np.float32(background)
    bounds = outlier_bounds(out)
    if bounds is not None and (out.min() < bounds[0] or out.max() > bounds[1]):
        out = np.clip(out, np.float32(bounds[0]), np.float32(bounds[1]))
    return out


def brain_mask(t1c: np.ndarray) -> np.ndarray:
    """The brain as the chain takes it: T1C voxels above ``BRAIN_REL_TOL`` of the T1C maximum (none
    when no voxel is positive)."""
    peak = float(t1c.max())
    return t1c > BRAIN_REL_TOL * peak if peak > 0 else np.zeros(t1c.shape, bool)
