"""How far ANTs' sampled metric moves the atlas registration: the BraTS 2021 case (already skull-stripped and
in SRI24 space) at 2 mm through the preprocessing chain, one run per seed. Run from the repository root:

    python benchmarks/registration_spread.py --brats ../shared/data/brats2021_00000 --seeds 10

Prints one JSON line per run (the affine's largest deviation from the identity matrix, the brain-mask Dice
with the atlas) and a summary line with their range. The case should stay where it is, so the deviation is
the registration's own error; `tests/test_preprocess.py` bounds it from this spread.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

import ants  # noqa: E402
import numpy as np  # noqa: E402

from scripts.preprocess import Chain, run_preprocessing  # noqa: E402


def downsampled(path: Path, out: Path, spacing: float = 2.0) -> Path:
    ants.image_write(ants.resample_image(ants.image_read(str(path)), (spacing,) * 3, use_voxels=False,
                                         interp_type=0), str(out))
    return out


def one_run(raw: Path, atlas: Path, out: Path, seed: int, transform: str, threads: int) -> dict:
    """The chain on the cases under `raw` into `out` with `seed`: the affine's deviation and the Dice."""
    chain = Chain(atlas=str(atlas), atlas_transform=transform, seed=seed, threads=threads)
    case = Path(run_preprocessing(str(out), input_dir=str(raw), chain=chain)) / "case"
    matrix = np.asarray(ants.read_transform(str(case / "t1c_to_atlas.mat")).parameters[:9]).reshape(3, 3)
    row = json.loads((case / "qc.json").read_text())
    return {"seed": seed, "transform": transform, "threads": threads,
            "max_abs_A_minus_I": round(float(np.abs(matrix - np.eye(3)).max()), 4), "dice_atlas": row["dice_atlas"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brats", type=Path, required=True, help="folder holding the case's _t1ce and _t2 files")
    parser.add_argument("--atlas", type=Path, default=None, help="the SRI24 T1 brain (default: the shipped one)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1")
    parser.add_argument("--transform", default="AffineFast", choices=("Affine", "AffineFast"))
    parser.add_argument("--threads", type=int, default=0, help="per case (0: the chain's default, all cores)")
    args = parser.parse_args()
    from scripts.preprocess.atlas import DEFAULT_ATLAS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        atlas = downsampled(args.atlas or DEFAULT_ATLAS, Path(tmp) / "atlas_2mm.nii.gz")
        raw = Path(tmp) / "raw"
        (raw / "case").mkdir(parents=True)
        for key in ("t1ce", "t2"):  # the case at 2 mm, once
            downsampled(next(args.brats.glob(f"*_{key}.nii.gz")), raw / "case" / f"case_{key}.nii.gz")
        for seed in range(args.seeds):
            rows.append(one_run(raw, atlas, Path(tmp) / f"seed_{seed}", seed, args.transform, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    summary = {key: [min(r[key] for r in rows), max(r[key] for r in rows)]
               for key in ("max_abs_A_minus_I", "dice_atlas")}
    print(json.dumps({"runs": len(rows), **summary}))


if __name__ == "__main__":
    main()
