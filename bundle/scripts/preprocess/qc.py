"""Quality control of a prepared case: brain-mask Dice with the atlas, normalised mutual information, the gate,
and the QC picture (atlas outline over the registered T1C, T2W against T1C, brain-mask contour)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary volumes (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else 1.0


def nmi(a: np.ndarray, b: np.ndarray, mask: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) of two images inside `mask`: 1 for independent
    intensities, 2 for a one-to-one mapping; misalignment lowers it."""
    inside = np.asarray(mask) > 0
    joint, _, _ = np.histogram2d(np.asarray(a)[inside], np.asarray(b)[inside], bins=bins)
    p = joint / max(joint.sum(), 1)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (entropy(p.sum(0)) + entropy(p.sum(1))) / max(entropy(p), 1e-12)


def gate(row: Mapping[str, float], min_dice: float, min_nmi: float) -> str:
    """Why a case fails the quality gate ('' when it passes)."""
    problems = []
    if row.get("dice_atlas") is not None and row["dice_atlas"] < min_dice:
        problems.append(f"brain-mask Dice with the atlas {row['dice_atlas']:.3f} < {min_dice}")
    if row.get("nmi_t2w_t1c") is not None and row["nmi_t2w_t1c"] < min_nmi:
        problems.append(f"T2W-T1C NMI {row['nmi_t2w_t1c']:.3f} < {min_nmi}")
    return "; ".join(problems)


def _scaled(volume: np.ndarray, inside: np.ndarray) -> np.ndarray:
    values = volume[inside] if inside.any() else volume.ravel()
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return np.clip((volume - low) / max(high - low, 1e-6), 0, 1)


def _views(volume: np.ndarray, centre: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through `centre` of an LPS-indexed volume, shown as radiologists do."""
    i, j, k = (int(c) for c in centre)
    return [np.rot90(volume[:, :, k]), np.rot90(volume[:, j, :]), np.rot90(volume[i, :, :])[:, ::-1]]


def save_qc_png(path: Path, t1c: np.ndarray, t2w: np.ndarray, mask: np.ndarray, atlas: np.ndarray | None,
                title: str) -> None:
    """Three views (rows) of: the registered T1C with the atlas brain outline (red), a T1C/T2W checkerboard
    (edges must run on across the tiles), and the T1C with the brain-mask contour (green)."""
    inside = mask > 0
    centre = np.argwhere(inside).mean(0) if inside.any() else np.array(mask.shape) / 2
    a, b = _scaled(t1c, inside), _scaled(t2w, inside)
    tiles = (np.indices(mask.shape) // 16).sum(0) % 2 == 0
    board = np.where(tiles, a, b)
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), facecolor="black")
    columns = [("T1C + atlas outline", a, atlas), ("T1C / T2W checkerboard", board, None),
               ("T1C + brain mask", a, mask)]
    for col, (name, image, outline) in enumerate(columns):
        outlines = _views(outline, centre) if outline is not None else [None] * 3
        for row, (view, line) in enumerate(zip(_views(image, centre), outlines)):
            ax = axes[row, col]
            ax.imshow(view, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if line is not None and (line > 0).any() and (line <= 0).any():
                ax.contour(line > 0, levels=[0.5], colors="red" if col == 0 else "lime", linewidths=0.8)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, color="white", fontsize=9)
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)
