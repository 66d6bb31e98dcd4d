"""Step time and memory of the reference implementation next to the bundle's, in one run.

Four measurements, each in a fresh child process, same `--size`, `--threads` and batch layout
(two cases per classification task + one segmentation case; one more such batch per surrogate
step, as both trainings draw):

- `reference_igreg`: one outer iteration of the authors' `IGReg` (copy_param into G1/G2/G3, two
  surrogate steps (stage 1), one main step (stage 2)), prototypes already initialised by k-means
  as after the first epoch;
- `reference_plain`: one plain multi-task step of the reference backbone (classification CE +
  segmentation Dice, one forward, backward and Lion step);
- `bundle_igreg`, `bundle_plain`: the bundle's IGReg and equal-weighting steps, measured by
  `bench_step.py` (same children).

The reference is imported from `<repo>/../shared/reference/IGReg/IGReg` (or `--reference`, or
$IGREG_REFERENCE) with the CPU shims of `tests/parity/reference.py`; its DPA's hard-coded
[160, 192, 160] upsampling is redirected to `--size`. Prints one JSON line. From the repository root:

    python benchmarks/bench_reference.py --size 64 64 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "parity"))

import torch  # noqa: E402
from bench_step import fixed_batch, peak_mib, run_child, time_calls  # noqa: E402

LION = {"lr": 1e-4, "weight_decay": 2e-5}
TASKS = 3


def reference_inputs(batch: dict, part: int) -> dict:
    """One part of a `bench_step.fixed_batch` in the reference's argument layout."""
    rows = batch["part"] == part
    image, label, seg = batch["image"][rows], batch["label"][rows], batch["seg"][rows]
    n = 2 * TASKS
    labels = torch.stack([label[2 * t:2 * t + 2, t] for t in range(TASKS)])
    onehot = torch.cat((1 - seg[n:], seg[n:]), 1)
    return {"cls": image[:n], "seg": image[n:], "labels": labels, "onehot": onehot}


def reference_child(args: argparse.Namespace) -> dict:
    """Time the reference's outer iteration (`ref_igreg`) or plain step (`ref_plain`)."""
    import reference
    from lion_pytorch import Lion

    ref = reference.load(args.reference)
    warnings.filterwarnings("ignore")
    batch = fixed_batch(TASKS, args.size, torch.device("cpu"), parts=1 + args.surrogate_steps)
    parts = [reference_inputs(batch, p) for p in range(1 + args.surrogate_steps)]
    ce = torch.nn.CrossEntropyLoss(reduction="mean")
    dice = ref.loss_utiles.SoftDiceLoss(smooth=1e-5, do_bg=False)
    with reference.dpa_size(args.size):
        if args._mode == "ref_plain":
            net = ref.Backbone_IGReg.Backbone(n_classes=2, num_channels=24).train()
            optim = Lion(filter(lambda p: p.requires_grad, net.parameters()), **LION)
            main = parts[0]

            def step() -> None:
                optim.zero_grad()
                loss_cls, loss_seg, _, _ = net(main["cls"], main["seg"], main["labels"], main["onehot"], ce, dice)
                (loss_cls + loss_seg).backward()
                optim.step()
        else:
            model = ref.IGReg(n_classes=2, num_channels=24, dim_proj=64, nc_pos=6, nc_neg=6, m=0.5).train()
            optim_main = Lion(filter(lambda p: p.requires_grad, model.parameters()), **LION)
            optim_g = [Lion(filter(lambda p: p.requires_grad, getattr(model, f"G{k}").parameters()), **LION)
                       for k in (1, 2, 3)]
            model.IGReg_DPA.init_cluster_seg(parts[0]["seg"], parts[0]["onehot"])  # as after the first epoch

            def step() -> None:
                for k in (1, 2, 3):
                    model.copy_param(getattr(model, f"G{k}"), model.IGReg_DPA.BranchMain)
                for p in parts[1:]:
                    for o in optim_g:
                        o.zero_grad()
                    model(p["cls"], p["seg"], p["labels"], p["onehot"], ce, dice, 0, *optim_g, step=1)
                    for o in optim_g:
                        o.step()
                main = parts[0]
                optim_main.zero_grad()
                loss = model(main["cls"], main["seg"], main["labels"], main["onehot"], ce, dice, 0, None, None, None,
                             step=2)
                loss.backward()
                optim_main.step()

        times, cpu = time_calls(step, args.warmup, args.repeats, lambda: None)
    return {"step_s": statistics.median(times), "times_s": [round(t, 3) for t in times],
            "cpu_s": statistics.median(cpu), "peak_mib": peak_mib(torch.device("cpu")),
            "threads": torch.get_num_threads()}


def run_reference_child(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--_mode", mode, "--size", *map(str, args.size),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += ["--reference", args.reference] if args.reference else []
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bundle_child(args: argparse.Namespace, mode: str) -> dict:
    """`bench_step.py`'s child for the bundle's strategy (`igreg` or `plain`)."""
    child = argparse.Namespace(size=args.size, device="cpu", repeats=args.repeats, warmup=args.warmup, demo_dir="",
                               threads=args.threads, amp=False, tiny=args.tiny_bundle, parts=False, flops=False,
                               surrogate_steps=args.surrogate_steps)
    return run_child(child, mode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64], metavar=("H", "W", "D"),
                        help="volume size (each side divisible by 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of every child")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--surrogate_steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help="folder of the reference code (holds model/IGReg.py)")
    parser.add_argument("--tiny_bundle", action="store_true", help="tiny bundle network (smoke tests only)")
    parser.add_argument("--_mode", choices=["ref_igreg", "ref_plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(s % 16 for s in args.size):
        parser.error("every side of --size must be divisible by 16")
    torch.set_num_threads(args.threads)
    if args._mode:
        torch.manual_seed(0)
        print(json.dumps(reference_child(args)))
        return
    results = {"reference_igreg": run_reference_child(args, "ref_igreg"),
               "reference_plain": run_reference_child(args, "ref_plain"),
               "bundle_igreg": run_bundle_child(args, "igreg"), "bundle_plain": run_bundle_child(args, "plain")}
    report = {"size": args.size, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
              "batch": f"{2 * TASKS} classification + 1 segmentation cases",
              "tiny_bundle": args.tiny_bundle, "load_avg_1min": round(os.getloadavg()[0], 2)}
    for name, r in results.items():
        report[f"{name}_s"] = round(r["step_s"], 3)
        report[f"{name}_times_s"] = r["times_s"]
        report[f"{name}_peak_mib"] = round(r["peak_mib"])
    report["reference_ratio"] = round(report["reference_igreg_s"] / report["reference_plain_s"], 2)
    report["bundle_ratio"] = round(report["bundle_igreg_s"] / report["bundle_plain_s"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
