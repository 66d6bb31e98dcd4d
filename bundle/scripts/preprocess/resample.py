"""One resampling per image: the chain's transforms composed onto the target grid (linear; masks nearest), the
brain mask applied, the background cropped; and the way back onto the raw T1C's grid."""
from __future__ import annotations

from pathlib import Path

import ants
import numpy as np


def identity_transform(path: Path) -> Path:
    """An identity affine written as an ANTs `.mat` (a switched-off step keeps the chain's shape)."""
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(path))
    return path


def to_target(target: ants.ANTsImage, t1c: ants.ANTsImage, t2w: ants.ANTsImage, mask: ants.ANTsImage,
              t1c_to_target: Path, t2w_to_t1c: Path, seg: ants.ANTsImage | None = None) -> dict[str, ants.ANTsImage]:
    """Every image on `target`'s grid, each resampled once through the composed transforms:
    ``t1c``, ``t2w`` (linear, not yet masked), ``mask`` and ``seg`` (nearest; seg lies in the T1C's space)."""
    t1c_chain, t2w_chain = [str(t1c_to_target)], [str(t1c_to_target), str(t2w_to_t1c)]  # last applied first
    out = {"t1c": ants.apply_transforms(target, t1c, t1c_chain, interpolator="linear"),
           "t2w": ants.apply_transforms(target, t2w, t2w_chain, interpolator="linear"),
           "mask": ants.apply_transforms(target, mask, t1c_chain, interpolator="nearestNeighbor")}
    if seg is not None:
        out["seg"] = ants.apply_transforms(target, seg, t1c_chain, interpolator="nearestNeighbor")
    return out


def apply_mask(images: dict[str, ants.ANTsImage], keys: tuple[str, ...] = ("t1c", "t2w")) -> dict:
    """`images` with the background (outside ``mask``) of `keys` set to exactly 0."""
    inside = images["mask"].numpy() > 0
    return {**images, **{k: images[k].new_image_like(np.where(inside, images[k].numpy(), 0).astype(np.float32))
                         for k in keys}}


def crop_box(mask: ants.ANTsImage, margin: int) -> tuple[list[int], list[int]]:
    """The brain mask's bounding box grown by `margin` voxels per side, within the grid."""
    where = np.argwhere(mask.numpy() > 0)
    if not len(where):
        raise ValueError("the brain mask is empty on the target grid")
    lower = np.maximum(where.min(0) - margin, 0)
    upper = np.minimum(where.max(0) + 1 + margin, mask.shape)
    return lower.tolist(), upper.tolist()


def crop(images: dict[str, ants.ANTsImage], box: tuple[list[int], list[int]]) -> dict[str, ants.ANTsImage]:
    """Every image cut to `box` (the physical placement is kept: the origin moves with the corner)."""
    return {k: ants.crop_indices(v, *box) for k, v in images.items()}


def to_raw_grid(mask: ants.ANTsImage, raw_t1c: ants.ANTsImage, t1c_to_target: Path) -> ants.ANTsImage:
    """A mask on the prepared grid mapped back onto the raw T1C's grid through the inverse transform (nearest)."""
    return ants.apply_transforms(raw_t1c, mask, [str(t1c_to_target)], interpolator="nearestNeighbor",
                                 whichtoinvert=[True])
