"""One raw case of the TCIA LGG-1p19q size through the whole preprocessing chain, with `Affine` and
`AffineFast`: seconds per step and the brain-mask Dice with the atlas. Run from the repository root:

    python benchmarks/bench_preprocess.py --threads 2
    python benchmarks/bench_preprocess.py --threads 2 --brats ../shared/data/brats2021_00000

No TCIA case ships with the project, so a "raw" case is synthesised from the BraTS 2021 case (read, never
copied): the T1C resampled onto a 256x256x196 grid of 0.9375x0.9375x1 mm holding the head turned by
(8, -5, 4) degrees, shifted by (12, -9, 15) mm and scaled by 1.06 (a scanner pose and size), the T2W onto a
512x512x53 grid of 0.47x0.47x3.3 mm in a second pose (2 more degrees, 3 mm further), both in scanner space.
The BraTS scans are skull-stripped: brain extraction sees a brain without its skull (its cost is that of a
head: deepbet works on a fixed 256^3 crop). Prints one JSON line per transform: wall and process CPU seconds,
seconds per step, the Dice, the T2W -> T1C error against the known poses, and the load of the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

TARGETS_S = {"Affine": 90.0, "AffineFast": 30.0}
TARGET_DICE = 0.94


def _pose(rotation_deg: tuple[float, float, float], shift: tuple[float, float, float], scale: float,
          centre: tuple[float, ...]) -> sitk.Transform:
    """Scanner point -> BraTS point: the head of the raw scan is the BraTS head turned, shifted and scaled."""
    rotation = np.asarray(sitk.Euler3DTransform((0, 0, 0), *np.deg2rad(rotation_deg)).GetMatrix()).reshape(3, 3)
    return sitk.AffineTransform((rotation / scale).ravel().tolist(), shift, centre)


def synthesise(brats: Path, out: Path) -> tuple[dict[str, str], dict[str, sitk.Transform]]:
    """The raw T1C and T2W files (see the module's docstring) and each one's pose (scanner -> BraTS point)."""
    t1c = sitk.ReadImage(str(next(brats.glob("*_t1ce.nii.gz"))), sitk.sitkFloat32)
    t2w = sitk.ReadImage(str(next(brats.glob("*_t2.nii.gz"))), sitk.sitkFloat32)
    centre = t1c.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in t1c.GetSize()])
    files, poses = {}, {}
    for key, image, size, spacing, rotation, shift in (
            ("t1c", t1c, (256, 256, 196), (0.9375, 0.9375, 1.0), (8, -5, 4), (12, -9, 15)),
            ("t2w", t2w, (512, 512, 53), (0.47, 0.47, 3.3), (10, -5, 4), (15, -9, 15))):
        grid = sitk.Image(list(size), sitk.sitkFloat32)
        grid.SetSpacing(spacing)
        grid.SetOrigin([c - (n - 1) * s / 2 for c, n, s in zip(centre, size, spacing)])
        poses[key] = _pose(rotation, shift, 1.06, centre)
        moved = sitk.Resample(image, grid, poses[key], sitk.sitkLinear, 0.0)
        files[key] = str(out / f"raw_{key}.nii.gz")
        sitk.WriteImage(sitk.Cast(moved, sitk.sitkInt16), files[key])
    return files, poses


def coregistration_error_mm(case: dict[str, str], poses: dict[str, sitk.Transform], transform: Path) -> float:
    """Mean distance (mm) over the T1C brain between where the estimated T2W -> T1C transform and the known
    poses send a T1C point in T2W space."""
    import ants
    import pandas as pd

    t1c = ants.image_read(case["t1c"])
    index = np.argwhere(t1c.numpy() > 0)[::200]
    points = np.array([t1c.origin]) + (index * np.array(t1c.spacing)) @ np.asarray(t1c.direction).T
    estimated = ants.apply_transforms_to_points(3, pd.DataFrame(points, columns=["x", "y", "z"]),
                                                [str(transform)]).values
    inverse = poses["t2w"].GetInverse()
    true = np.array([inverse.TransformPoint(poses["t1c"].TransformPoint(p.tolist())) for p in points])
    return float(np.linalg.norm(estimated - true, axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--brats", default=str(REPO.parent / "shared" / "data" / "brats2021_00000"))
    parser.add_argument("--transforms", nargs="+", default=["Affine", "AffineFast"])
    args = parser.parse_args()
    from scripts.preprocess.workflow import Chain, _init_worker, _run_one

    _init_worker(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, poses = synthesise(Path(args.brats), tmp)
        case = {"case_id": "synthetic_tcia", **files}
        for transform in args.transforms:
            start, cpu = time.perf_counter(), time.process_time()
            row, error = _run_one(case, tmp / f"out_{transform}", Chain(atlas_transform=transform))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if error:
                raise SystemExit(f"{transform}: {error['problem']}")
            steps = {k: v for k, v in row.items() if k.endswith("_s") and v is not None}
            print(json.dumps({"atlas_transform": transform, "threads": args.threads, "wall_s": round(wall, 1),
                              "cpu_s": round(cpu, 1),
                              **steps, "dice_atlas": row["dice_atlas"], "nmi_t2w_t1c": row["nmi_t2w_t1c"],
                              "coregistration_error_mm": round(coregistration_error_mm(
                                  case, poses, tmp / f"out_{transform}" / "t2w_to_t1c.mat"), 2),
                              "target_s": TARGETS_S.get(transform), "target_dice": TARGET_DICE,
                              "meets_targets": wall <= TARGETS_S.get(transform, np.inf)
                              and row["dice_atlas"] >= TARGET_DICE,
                              "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
