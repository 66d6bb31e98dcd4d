"""Speed and memory of one IGReg outer iteration against one plain multi-task step.

On one fixed random batch (two cases per classification task, one segmentation case; IGReg gets one
more such batch per surrogate step, as in training) and after warm-up, it times (a) one IGReg outer
iteration (copy into the surrogates, the surrogate steps on their own batches, the main step) and
(b) one equal-weighting step (task cross-entropies + segmentation Dice, one forward, one backward,
one optimizer step) of the same network, built from `configs/train.yaml`. Each runs in
a fresh child process (this script with `--_mode`), so its peak memory is the peak RSS of that whole
process on CPU (interpreter, imports, network, optimizer states, activations: nothing subtracted),
or `torch.cuda.max_memory_allocated` on CUDA. A third child times the training loader of the demo
configuration (`train.yaml` + `demo.yaml`, its dataset cache) and the configured strategy's step on
those batches with the demo network, so that loading can be compared with training. Prints one JSON
line. `--parts` adds the time of each part of a step; `--flops` the arithmetic of one step (the
convolutions' and matrix products' floating-point operations, forward and backward) per part, whose
IGReg / plain ratio is the floor of the time ratio for this computation. Run from the repository root:

    python benchmarks/bench_step.py --size 64 64 64
    python benchmarks/bench_step.py --device cuda --amp --size 160 192 160
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

    from scripts.mtl.base import MTLStrategy

TINY_NET = {"num_channels": 4, "widths": [8, 16, 16, 16], "depths": [1, 1, 1, 1], "cardinality": 4}
STRATEGY_OF_MODE = {"igreg": "igreg", "plain": "equal"}


def load_config(demo: bool, tiny: bool, demo_dir: str | None = None) -> ConfigParser:
    """`train.yaml` (+ `demo.yaml`) with the bundle root set; `tiny` shrinks the network (tests)."""
    from monai.bundle import ConfigParser  # imported by the child processes only

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ["train.yaml"] + (["demo.yaml"] if demo else [])])
    parser["bundle_root"] = str(BUNDLE)
    if demo_dir is not None:
        parser["dataset_dir"] = parser["demo_dir"] = demo_dir
    if tiny:
        for key, value in TINY_NET.items():
            parser[f"network_def#{key}"] = value
    return parser


def build(parser: ConfigParser, name: str, device: torch.device, amp: bool) -> MTLStrategy:
    """The strategy `name` around the configured network, Lion optimizer, IGReg options and memory format."""
    from scripts.mtl import build_strategy

    network = parser.get_parsed_content("network_def").to(device)
    return build_strategy(name, network, parser.get_parsed_content("optimizer"), amp,
                          parser.get_parsed_content("igreg"), parser.get_parsed_content("strategy#channels_last"))


def fixed_batch(tasks: int, size: list[int], device: torch.device, seed: int = 0,
                parts: int = 1) -> dict[str, torch.Tensor]:
    """Per part (the main batch, then one per surrogate step that takes its own batch): task t's
    class-0 and class-1 rows for every task, then one segmentation row with a box tumor."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * tasks
    label = torch.full((n + 1, tasks), -1, dtype=torch.long)
    for t in range(tasks):
        label[2 * t:2 * t + 2, t] = torch.tensor([0, 1])
    seg = torch.zeros(n + 1, 1, *size)
    seg[-1, :, size[0] // 4:size[0] // 2, size[1] // 3:2 * size[1] // 3, size[2] // 4:size[2] // 2] = 1
    has_seg = torch.zeros(n + 1, dtype=torch.bool)
    has_seg[-1] = True
    images = [torch.randn(n + 1, 2, *size, generator=gen) + 2 * seg for _ in range(parts)]
    batch = {"image": torch.cat(images), "label": label.repeat(parts, 1), "seg": seg.repeat(parts, 1, 1, 1, 1),
             "has_seg": has_seg.repeat(parts), "part": torch.arange(parts).repeat_interleave(n + 1)}
    return {k: v.to(device) for k, v in batch.items()}


class PartTimer:
    """Wall and process CPU time spent in chosen methods or module functions, summed per label and per
    step (CPU time under the key `label + "/cpu"`); `current` is the innermost part running."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.totals = sync, defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.running: list[str] = []

    @property
    def current(self) -> str:
        return self.running[-1] if self.running else "rest"

    def wrap(self, owner: object, attribute: str, label: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self.sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            self.running.append(label)
            try:
                return inner(*args, **kwargs)
            finally:
                self.running.pop()
                self.sync()
                self.totals[label] += time.perf_counter() - start
                self.totals[label + "/cpu"] += time.process_time() - start_cpu

        setattr(owner, attribute, timed)

    def end_step(self, keep: bool) -> None:
        """Close the current step's totals (kept for `medians` when `keep`)."""
        if keep:
            self.steps.append(dict(self.totals))
        self.totals.clear()

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(step.get(k, 0.0) for step in self.steps) for k in self.steps[0]}


_shapes = partial(tree_map, lambda x: x.shape if isinstance(x, torch.Tensor) else x)  # what flop formulas read


class FlopCounter(TorchDispatchMode):
    """Floating-point operations of the convolutions and matrix products run under it, forward and
    backward (torch's own per-operator formulas), summed per part: `part()` names the part running."""

    def __init__(self, part: Callable[[], str]) -> None:
        super().__init__()
        self.part, self.flops = part, defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.part()] += formula(*_shapes(args), **_shapes(kwargs), out_val=_shapes(out))
        return out


def time_calls(call: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None],
               timer: PartTimer | None = None) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds of each of `repeats` calls of `call` after `warmup` untimed ones
    (`timer` keeps the parts of the timed ones)."""
    wall, cpu = [], []
    for i in range(warmup + repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        sync()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if timer is not None:
            timer.end_step(keep=i >= warmup)
    return wall, cpu


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_child(args: argparse.Namespace) -> dict:
    """One strategy on the fixed batch: step times, peak memory and (with --parts) a time breakdown."""
    import scripts.mtl.base
    import scripts.mtl.igreg

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parser = load_config(demo=False, tiny=args.tiny)
    if args.surrogate_steps is not None:
        parser["surrogate_steps"] = args.surrogate_steps
    strategy = build(parser, STRATEGY_OF_MODE[args._mode], device, args.amp)
    batch = fixed_batch(len(strategy.network.tasks), args.size, device, parts=1 + strategy.surrogate_batches)
    strategy.initialize([batch])
    timer = None
    if args.parts or args.flops:
        timer = PartTimer(sync)
        for module in (scripts.mtl.base, scripts.mtl.igreg):  # the guards of the updates and of the surrogates
            timer.wrap(module, "non_finite_names", "guard")
        for function, label in [("task_gradients", "surrogate_task_gradients"),  # parts of surrogate_updates
                                ("synced_task_gradients", "surrogate_task_gradients"),
                                ("projected_update", "surrogate_projection_lion")]:
            if hasattr(scripts.mtl.igreg, function):
                timer.wrap(scripts.mtl.igreg, function, label)
        for attribute, label in [("forward_tasks", "forward"), ("dpa_losses", "dpa_losses"),
                                 ("sync_surrogates", "copy"), ("encoded_task_batches", "surrogate_batches_encoder"),
                                 ("surrogate_update", "surrogate_updates"),
                                 ("feature_regularizer", "feature_reg"), ("_update", "main_backward_step")]:
            if hasattr(strategy, attribute):
                timer.wrap(strategy, attribute, label)
    times, cpu = time_calls(lambda: strategy.step(batch), args.warmup, args.repeats, sync, timer)
    out = {"step_s": statistics.median(times), "times_s": [round(t, 3) for t in times], "cpu_s": statistics.median(cpu),
           "peak_mib": peak_mib(device), "threads": torch.get_num_threads(), "skipped": strategy.skipped,
           "surrogate_steps": getattr(strategy, "surrogate_steps", 0)}
    if args.flops:  # one more step, counted (not timed: the counting slows every operator)
        with FlopCounter(lambda: timer.current) as counter:
            strategy.step(batch)
        out["gflop"] = sum(counter.flops.values()) / 1e9
        out["gflop_parts"] = {k: round(v / 1e9, 3) for k, v in counter.flops.items()}
    if args.parts:
        medians = timer.medians()
        out["parts_s"] = {k: round(v, 3) for k, v in medians.items() if not k.endswith("/cpu")}
        out["parts_cpu_s"] = {k[:-4]: round(v, 3) for k, v in medians.items() if k.endswith("/cpu")}
    return out


def endless(loader: Iterable[dict]) -> Iterator[dict]:
    """The loader's batches, pass after pass."""
    while True:
        yield from loader


def data_child(args: argparse.Namespace) -> dict:
    """Demo configuration: time to fill the dataset cache, per training batch, and per step of the
    configured strategy (demo network) on those batches."""
    from scripts.data import ensure_demo_cohort
    from scripts.engine import prepare_batch

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parser = load_config(demo=True, tiny=args.tiny, demo_dir=str(Path(args.demo_dir).resolve()))
    ensure_demo_cohort(parser.get_parsed_content("dataset_dir"))
    start = time.perf_counter()
    parser.get_parsed_content("train#dataset")
    cache_s = time.perf_counter() - start
    batches = endless(parser.get_parsed_content("train#dataloader"))
    load_times, _ = time_calls(lambda: next(batches), args.warmup, args.repeats, lambda: None)
    strategy = build(parser, parser["mtl_strategy"], device, args.amp)
    on_device = []
    for _ in range(1 + args.warmup + args.repeats):
        image, targets = prepare_batch(next(batches), device)  # the trainer's own move to the device
        on_device.append({"image": image, **targets})
    strategy.initialize(on_device[:1])
    queue = iter(on_device[1:])
    step_times, _ = time_calls(lambda: strategy.step(next(queue)), args.warmup, args.repeats, sync)
    return {"cache": parser["cache"], "cache_s": cache_s, "batch_s": statistics.median(load_times),
            "spatial_size": parser["spatial_size"], "strategy": parser["mtl_strategy"],
            "step_s": statistics.median(step_times)}


def run_child(args: argparse.Namespace, mode: str) -> dict:
    """This script in a fresh process with `--_mode mode`; its last stdout line is its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_mode", mode, "--size", *map(str, args.size),
               "--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--demo_dir", args.demo_dir]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--surrogate_steps", str(args.surrogate_steps)] if args.surrogate_steps is not None else []
    command += [flag for flag, on in [("--amp", args.amp), ("--tiny", args.tiny), ("--parts", args.parts),
                                      ("--flops", args.flops)] if on]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64], metavar=("H", "W", "D"),
                        help="volume size of the fixed batch (each side divisible by 16)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as the bundle's `amp`)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--demo_dir", default=str(BUNDLE / "demo_data"),
                        help="demo cohort for the data-loading figures (generated when absent)")
    parser.add_argument("--skip_data", action="store_true", help="leave out the data-loading figures")
    parser.add_argument("--parts", action="store_true", help="add the time per part of each step")
    parser.add_argument("--flops", action="store_true",
                        help="add the convolution and matrix-product GFLOP of one step, per innermost part")
    parser.add_argument("--surrogate_steps", type=int, default=None,
                        help="IGReg's surrogate steps per outer iteration (default: train.yaml's, 2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny network instead of the configured ones (tests)")
    parser.add_argument("--_mode", choices=["igreg", "plain", "data"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.amp and args.device != "cuda":
        parser.error("--amp needs --device cuda (the bundle ignores amp on CPU)")
    if any(s % 16 for s in args.size):
        parser.error("every side of --size must be divisible by 16")
    if args._mode:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        result = data_child(args) if args._mode == "data" else step_child(args)
        print(json.dumps(result))
        return
    igreg, plain = run_child(args, "igreg"), run_child(args, "plain")
    report = {"size": args.size, "device": args.device, "threads": igreg["threads"],
              "surrogate_steps": igreg["surrogate_steps"],
              "igreg_s": round(igreg["step_s"], 3), "plain_s": round(plain["step_s"], 3),
              "ratio": round(igreg["step_s"] / plain["step_s"], 2),
              "igreg_peak_mib": round(igreg["peak_mib"]), "plain_peak_mib": round(plain["peak_mib"]),
              "mem_ratio": round(igreg["peak_mib"] / plain["peak_mib"], 2),
              "peak": "max_memory_allocated" if args.device == "cuda" else "peak RSS of a fresh process",
              "amp": args.amp, "repeats": args.repeats, "warmup": args.warmup,
              "igreg_times_s": igreg["times_s"], "plain_times_s": plain["times_s"],
              "ratio_best": round(min(igreg["times_s"]) / min(plain["times_s"]), 2),
              "igreg_cpu_s": round(igreg["cpu_s"], 3), "plain_cpu_s": round(plain["cpu_s"], 3),
              "skipped": igreg["skipped"] + plain["skipped"], "load_avg_1min": round(os.getloadavg()[0], 2)}
    if args.parts:
        report.update(igreg_parts_s=igreg["parts_s"], plain_parts_s=plain["parts_s"],
                      igreg_parts_cpu_s=igreg["parts_cpu_s"], plain_parts_cpu_s=plain["parts_cpu_s"])
    if args.flops:
        report.update(igreg_gflop=round(igreg["gflop"], 3), plain_gflop=round(plain["gflop"], 3),
                      flop_ratio=round(igreg["gflop"] / plain["gflop"], 2),
                      igreg_gflop_parts=igreg["gflop_parts"], plain_gflop_parts=plain["gflop_parts"])
    if not args.skip_data:
        data = run_child(args, "data")
        report.update(batch_s=round(data["batch_s"], 3), demo_step_s=round(data["step_s"], 3),
                      data_keeps_up=data["batch_s"] < data["step_s"],
                      demo={k: data[k] for k in ("spatial_size", "cache", "strategy")},
                      cache_fill_s=round(data["cache_s"], 1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
