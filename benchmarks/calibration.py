"""Temperature scaling of trained models: per seed, copy the run's model.pt, fit the temperatures on
the validation split (`--calibrate true`, stored in the copy), then evaluate the copy on the testing
split and read each task's ECE and NLL before (raw) and after (temperature-scaled) from its metrics.json.
The runs' own files are never written.

Prints one JSON line per seed, then the mean ± sample standard deviation over the seeds as a
Markdown table; `--output` also gets `calibration.json` (every figure) and the seeds' reports.

    OMP_NUM_THREADS=1 python benchmarks/calibration.py --runs bundle/docs/ablation/igreg --seeds 0 1 2 3 4 \\
        --output "$(mktemp -d)"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
from monai.bundle import ConfigWorkflow  # noqa: E402

CONFIGS = [str(BUNDLE / "configs" / f"{n}.yaml") for n in ("train", "evaluate", "demo")]


def evaluate(ckpt_dir: Path, output_dir: Path, split: str, calibrate: bool, overrides: dict[str, Any]) -> dict:
    """metrics.json of one evaluation of `ckpt_dir/model.pt` (configs train + evaluate + demo)."""
    wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="eval", run_id="evaluating", bundle_root=str(BUNDLE),
                        ckpt_dir=str(ckpt_dir), output_dir=str(output_dir), val_split=split,
                        calibrate=calibrate, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return json.loads((output_dir / "metrics.json").read_text())


def calibrate_seed(run_dir: Path, work: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Fit on validation and test one run's model (a copy in `work`); the seed's figures."""
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "models" / "model.pt", models / "model.pt")
    val = evaluate(models, work / "validation", "validation", True, overrides)
    test = evaluate(models, work / "testing", "testing", False, overrides)
    tasks = list(test["tasks"])
    return {"temperature": val["calibration"]["temperature"], "skipped": val["calibration"]["skipped"],
            "val_ece_before": val["calibration"]["ece_before"], "val_ece_after": val["calibration"]["ece_after"],
            "test_ece_before": {t: test["tasks"][t]["ece"] for t in tasks},
            "test_ece_after": {t: test["tasks"][t].get("ece_calibrated") for t in tasks},
            "test_nll_before": test["calibration"]["nll_before"], "test_nll_after": test["calibration"]["nll_after"],
            "test_n": {t: test["tasks"][t]["n"] for t in tasks}}


def _mean_sd(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.3f} ± {sd:.3f}"


def table(results: dict[int, dict[str, Any]]) -> str:
    """Markdown: per task, the temperature and the test ECE and NLL before and after (mean ± sd over the
    seeds), and the number of seeds whose score the temperature lowered."""
    tasks = list(next(iter(results.values()))["test_ece_before"])
    lines = ["| task | T (fitted on validation) | test ECE before | test ECE after | seeds with a lower ECE | "
             "test NLL before | test NLL after | seeds with a lower NLL |", "|---|---|---|---|---|---|---|---|"]
    runs = list(results.values())
    for t in tasks:
        cells = [_mean_sd([r[key].get(t) for r in runs]) for key in ("temperature", "test_ece_before",
                                                                     "test_ece_after", "test_nll_before",
                                                                     "test_nll_after")]
        for i, name in ((3, "ece"), (6, "nll")):
            pairs = [(r[f"test_{name}_before"][t], r[f"test_{name}_after"].get(t)) for r in runs]
            cells.insert(i, f"{sum(a is not None and a < b for b, a in pairs)} of {len(pairs)}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="folder holding seed_<k>/models/model.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--output", required=True, help="work folder: the model copies and the reports")
    parser.add_argument("--dataset_dir", default=None, help="default: the configs' (the demo cohort)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"num_workers": 0, **({"dataset_dir": args.dataset_dir} if args.dataset_dir else {})}
    out, results, start = Path(args.output), {}, time.perf_counter()
    for seed in args.seeds:
        results[seed] = calibrate_seed(Path(args.runs) / f"seed_{seed}", out / f"seed_{seed}", overrides)
        print(json.dumps({"seed": seed, **results[seed]}), flush=True)
    (out / "calibration.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"{len(results)} seeds in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
