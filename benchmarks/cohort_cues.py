"""How well one hand-made image feature per task separates the classes of a cohort: a yardstick for
what a trained network's ROC-AUC could reach, not a classifier.

Per case with a tumor mask on the T1C grid (cases whose T2W lies on another grid are left out):

- grade: share of brain voxels whose T1C exceeds 1.35 x the brain's 75th T1C percentile (enhancement);
- idh: median T2W in the tumor core (labels 1 and 4) over the brain's median T2W;
- 1p19q: coefficient of variation of T2W in the tumor core (heterogeneity, calcification).

Prints one JSON line per split: the number of cases and, per task, the cases with a label and the
ROC-AUC of its feature (above 0.5: larger values go with class 1).

    python benchmarks/cohort_cues.py --datalist bundle/demo_data/datalist.json --splits validation testing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_roc_auc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.data import SPLITS, TASKS, load_datalist  # noqa: E402


def case_features(case: dict) -> dict[str, float] | None:
    """The three features of one case (absolute paths, as `load_datalist` gives them), or None
    without a mask on the T1C grid."""
    if "seg" not in case:
        return None
    t1c, t2w, seg = (np.asarray(nib.load(case[k]).dataobj, dtype=np.float32) for k in ("t1c", "t2w", "seg"))
    if not t1c.shape == t2w.shape == seg.shape:
        return None
    brain, core = t1c > 0, (seg == 1) | (seg == 4)
    if not core.any():
        return None
    core_t2 = t2w[core]
    return {"grade": float((t1c[brain] > 1.35 * np.percentile(t1c[brain], 75)).mean()),
            "idh": float(np.median(core_t2) / np.median(t2w[brain])),
            "1p19q": float(core_t2.std() / core_t2.mean())}


def split_auc(cases: list[dict]) -> dict:
    """Per task: labelled cases with features and the ROC-AUC of the task's feature."""
    rows = [(c, f) for c in cases if (f := case_features(c)) is not None]
    out: dict = {"cases_with_mask": len(rows)}
    for task in TASKS:
        pairs = [(f[task], c[task]) for c, f in rows if c.get(task, -1) in (0, 1)]
        if len({y for _, y in pairs}) < 2:
            continue
        x, y = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        out[task] = {"cases": len(pairs), "roc_auc": round(float(compute_roc_auc(x, y)), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datalist", default="bundle/demo_data/datalist.json")
    parser.add_argument("--splits", nargs="+", default=["validation"], choices=SPLITS)
    args = parser.parse_args()
    for split in args.splits:
        print(json.dumps({"split": split, **split_auc(load_datalist(args.datalist, split))}))


if __name__ == "__main__":
    main()
