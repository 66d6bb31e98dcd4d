"""T2W -> T1C co-registration (antspyx), started from the scanner geometry (the two series' headers)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import ants

TRANSFORMS = ("Rigid", "Affine", "QuickRigid", "AffineFast")


def register(fixed: ants.ANTsImage, moving: ants.ANTsImage, transform: str, out_path: Path,
             initial: str | None = "Identity", iterations: Sequence[int] | None = None) -> Path:
    """The linear transform (ANTs `.mat`) mapping `fixed`'s physical space into `moving`'s, written to
    `out_path`: ``ants.apply_transforms(fixed, moving, [out_path])`` resamples `moving` onto `fixed`.
    `initial` ``Identity`` starts from the headers' placement (the scanner geometry), None from the
    images' centres of mass; `iterations` per level (shrink 6, 4, 2, 1) replace ANTs' defaults for the type."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform {transform!r} is not one of {', '.join(TRANSFORMS)}")
    levels = {"aff_iterations": tuple(int(i) for i in iterations)} if iterations else {}
    result = ants.registration(fixed, moving, type_of_transform=transform, **levels,
                               initial_transform=None if initial is None else [initial],
                               outprefix=str(out_path.with_suffix("")) + "_")
    shutil.move(result["fwdtransforms"][0], out_path)
    return out_path


def coregister(t1c: ants.ANTsImage, t2w: ants.ANTsImage, out_path: Path, transform: str = "Rigid",
               iterations: Sequence[int] | None = (1000, 500, 250, 50), spacing: float | None = 2.0) -> Path:
    """T2W onto T1C (`transform`: ``Rigid`` for one subject's two series, or ``Affine``), registered on copies
    resampled to `spacing` mm (None: the T1C's own grid): a quarter of the voxels of a 1 mm scan, the same
    physical transform."""
    if spacing:
        t1c, t2w = (ants.resample_image(i, (float(spacing),) * 3, use_voxels=False, interp_type=0) for i in (t1c, t2w))
    return register(t1c, t2w, transform, out_path, iterations=iterations)
