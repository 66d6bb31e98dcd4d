"""The per-case PNG report: T1C and T2W through the tumour's centre in three orientations with the
predicted mask's contour, each task's saliency as an overlay, and the class probabilities as bars."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ORIENTATIONS = ("axial", "coronal", "sagittal")


def centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel nearest to the centroid of `mask`, or the volume's centre when the mask is empty."""
    points = np.argwhere(mask > 0)
    if not len(points):
        return tuple(int(s) // 2 for s in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in points.mean(0))  # type: ignore[return-value]


def plane(volume: np.ndarray, orientation: str, at: Sequence[int]) -> np.ndarray:
    """The slice of an RAS volume [X, Y, Z] through `at`, transposed for `imshow(origin="lower")`:
    axial (X right, Y up), coronal (X right, Z up), sagittal (Y right, Z up)."""
    if orientation == "axial":
        return volume[:, :, at[2]].T
    if orientation == "coronal":
        return volume[:, at[1], :].T
    return volume[at[0], :, :].T


def _window(image: np.ndarray) -> tuple[float, float]:
    inside = image[image != 0]
    if not inside.size:
        return float(image.min()), float(image.max()) + 1e-6
    lo, hi = np.percentile(inside, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def write_report(path: str | os.PathLike, image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray,
                 maps: Mapping[str, torch.Tensor | np.ndarray], probabilities: Mapping[str, Sequence[float]],
                 class_names: Mapping[str, Sequence[str]] | None = None, title: str = "",
                 method: str = "gradcam") -> None:
    """Write the report of one case to `path` (PNG). `image` [2, X, Y, Z] (T1C, T2W), `mask` [X, Y, Z]
    and `maps` {task: [X, Y, Z] in [0, 1]} on one RAS grid (the network's input grid)."""
    image, mask = np.asarray(image, np.float32), np.asarray(mask)
    maps = {t: np.asarray(m, np.float32) for t, m in maps.items()}
    tasks = list(maps)
    at = centre(mask)
    windows = [_window(image[c]) for c in range(2)]
    columns = ["T1C", "T2W"] + [f"{t} saliency" for t in tasks]
    fig = plt.figure(figsize=(2.3 * len(columns) + 1.2, 9.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 1.0])
    axes = top.subplots(len(ORIENTATIONS), len(columns), squeeze=False)
    overlay = None
    for r, orientation in enumerate(ORIENTATIONS):
        contour = plane(mask, orientation, at)
        for c, name in enumerate(columns):
            ax = axes[r, c]
            channel = 1 if c == 1 else 0
            ax.imshow(plane(image[channel], orientation, at), cmap="gray", origin="lower",
                      vmin=windows[channel][0], vmax=windows[channel][1], interpolation="nearest")
            if c >= 2:
                overlay = ax.imshow(plane(maps[tasks[c - 2]], orientation, at), cmap="inferno", origin="lower",
                                    vmin=0.0, vmax=1.0, alpha=0.55, interpolation="bilinear")
            if contour.any():
                ax.contour(contour, levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(orientation, fontsize=9)
    if overlay is not None:
        bar = top.colorbar(overlay, ax=axes[:, 2:].ravel().tolist(), shrink=0.6, label=f"saliency ({method}, 0-1)")
        bar.solids.set_alpha(1.0)  # the scale itself, not as blended over the image
    top.suptitle(f"{title}: slices through the predicted tumour's centre (voxel {at}); cyan: predicted mask",
                 fontsize=10)
    bars = bottom.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(bars, tasks):
        probs = [float(p) for p in probabilities[task]]
        names = list((class_names or {}).get(task) or [str(i) for i in range(len(probs))])
        colours = ["tab:orange" if i == int(np.argmax(probs)) else "tab:blue" for i in range(len(probs))]
        ax.barh(names, probs, color=colours)
        ax.set_xlim(0, 1)
        ax.set_title(f"{task}: P(class)", fontsize=9)
        for i, p in enumerate(probs):
            ax.text(min(p + 0.02, 0.8), i, f"{p:.2f}", va="center", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.savefig(os.fspath(path), dpi=80, format="png")
    plt.close(fig)
