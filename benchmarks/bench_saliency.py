"""Seconds per case of inference with and without ``--saliency`` (inference.yaml + demo.yaml, the demo
cohort's testing cases). Run from the repository root:

    python benchmarks/bench_saliency.py --threads 2 --cases 5
    python benchmarks/bench_saliency.py --threads 2 --cases 5 --ckpt_path bundle/models/model.pt --method occlusion

Each mode runs the whole inference command (loading, preprocessing, prediction, inversion onto the T1C grid,
writing; with saliency also the maps, their inversion, the reports and index.html) over the same cases into
a fresh folder, after one untimed warm-up case per mode; `run()` is timed, building the network and loading
the checkpoint are not. Without `--ckpt_path` the network keeps its initial weights (the cost does not depend
on them). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

import torch  # noqa: E402

TARGET_S = 30.0  # seconds per case with saliency at the demo size on 2 threads (the target)


def run_inference(cases: list[dict], output_dir: str, saliency: bool, method: str, ckpt_path: str | None,
                  overrides: dict) -> float:
    """Wall seconds of one inference run over `cases` (a datalist written beside `output_dir`)."""
    from monai.bundle import ConfigWorkflow

    datalist = Path(output_dir + ".json")
    datalist.write_text(json.dumps({"testing": cases}))
    settings = {"load_pretrain": False} if ckpt_path is None else {"ckpt_path": ckpt_path}
    wf = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / "inference.yaml"), str(BUNDLE / "configs" / "demo.yaml")],
                        workflow_type="infer", bundle_root=str(BUNDLE), datalist=str(datalist), output_dir=output_dir,
                        saliency=saliency, saliency_method=method, **settings, **overrides)
    wf.initialize()
    start = time.perf_counter()
    wf.run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5, help="testing cases timed (after one warm-up case)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="gradcam", choices=["gradcam", "gradcampp", "occlusion"])
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--datalist", default=str(BUNDLE / "demo_data" / "datalist.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny network at 32^3 (tests only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from scripts.data import ensure_demo_cohort, load_datalist

    if args.datalist == str(BUNDLE / "demo_data" / "datalist.json"):
        ensure_demo_cohort(str(BUNDLE / "demo_data"))
    testing = load_datalist(args.datalist, "testing")
    cases = [{k: c[k] for k in ("case_id", "t1c", "t2w")} for c in testing[:args.cases + 1]]
    overrides = {"num_workers": 0}
    if args.tiny:
        overrides.update({"spatial_size": [32, 32, 32], "pixdim": [8.0, 8.0, 8.0], "network_def#num_channels": 4,
                          "network_def#widths": [8, 16, 16, 16], "network_def#depths": [1, 1, 1, 1]})
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("plain", "saliency"):
            run_inference(cases[:1], os.path.join(tmp, f"warmup_{mode}"), mode == "saliency", args.method,
                          args.ckpt_path, overrides)
            seconds[mode] = run_inference(cases[1:], os.path.join(tmp, mode), mode == "saliency", args.method,
                                          args.ckpt_path, overrides) / len(cases[1:])
    print(json.dumps({"cases": len(cases) - 1, "threads": args.threads, "method": args.method,
                      "plain_s_per_case": round(seconds["plain"], 3),
                      "saliency_s_per_case": round(seconds["saliency"], 3),
                      "saliency_overhead_s_per_case": round(seconds["saliency"] - seconds["plain"], 3),
                      "target_s_per_case": TARGET_S, "meets_target": seconds["saliency"] < TARGET_S,
                      "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
