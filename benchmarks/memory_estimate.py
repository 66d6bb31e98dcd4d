"""Estimate, without a GPU, the CUDA memory of one training step at full resolution.

For a few small volume sizes it runs one step of a strategy (the default network of
`configs/train.yaml`, the fixed batch of `bench_step.py`) on the CPU and records the peak of the bytes
held by live tensors (every storage created by an ATen op, counted until it is freed), which is what
`torch.cuda.max_memory_allocated` counts on a GPU. With `--amp` the regions that the strategy runs
under autocast follow CUDA's bf16 autocast cast policy for the ops this network uses (convolutions,
linear layers, matmul and PReLU in bf16; group norm, softmax, cross-entropy, norms, sums, exp/log in
float32; everything else in the dtype of its inputs), so the saved activations have the dtypes they
have on a GPU. The peak grows linearly with the number of voxels; the fitted line is evaluated at
the target size. Not counted: the CUDA context, cuDNN workspaces and the caching allocator's slack.

    python benchmarks/memory_estimate.py --sizes 32 48 64 --amp --target 160 192 160
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build, fixed_batch, load_config  # noqa: E402

TO_BF16 = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose3d, F.linear, torch.matmul, torch.mm,
           torch.bmm, torch.addmm, torch.baddbmm, torch.einsum, torch.prelu, F.prelu, Tensor.matmul, Tensor.__matmul__,
           Tensor.mm, Tensor.bmm}
TO_FP32 = {F.group_norm, F.layer_norm, torch.softmax, F.softmax, Tensor.softmax, torch.log_softmax, F.log_softmax,
           Tensor.log_softmax, F.cross_entropy, F.nll_loss, torch.exp, Tensor.exp, torch.log, Tensor.log, torch.pow,
           Tensor.pow, Tensor.__pow__, F.softplus, F.normalize, F.cosine_similarity, torch.cdist, torch.sum, Tensor.sum,
           torch.norm, Tensor.norm, torch.linalg.vector_norm, torch.cumsum, torch.prod, F.mse_loss,
           F.binary_cross_entropy_with_logits, torch.rsqrt, torch.reciprocal}


class CudaAutocastPolicy(TorchFunctionMode):
    """The casts of `torch.autocast("cuda", torch.bfloat16)` for the ops above, on any device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in TO_BF16 else torch.float32 if func in TO_FP32 else None
        if dtype is not None:
            def cast(x):
                return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under the mode and not yet freed (`now`), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.refs:
            return
        self.refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key: int, size: int) -> None:
        self.refs.pop(key, None)
        self.now -= size


def measure(strategy_name: str, size: list[int], amp: bool) -> dict:
    """Live-tensor MiB once the strategy is built and initialised, and at the peak of its first step
    (which allocates the gradients and the optimizer states)."""
    parser = load_config(demo=False, tiny=False)
    with LiveTensorBytes() as live:
        strategy = build(parser, strategy_name, torch.device("cpu"), amp=False)
        if amp:
            strategy.autocast = CudaAutocastPolicy
        parts = 1 + strategy.surrogate_batches
        batch = fixed_batch(len(strategy.network.tasks), size, torch.device("cpu"), parts=parts)
        strategy.initialize([batch])
        static = live.now
        live.peak = live.now
        strategy.step(batch)
        peak, after = live.peak, live.now
        del strategy, batch
        gc.collect()
    mib = 2 ** 20
    return {"strategy": strategy_name, "size": size, "voxels": size[0] * size[1] * size[2], "amp": amp,
            "built_mib": round(static / mib, 1), "after_step_mib": round(after / mib, 1),
            "step_peak_mib": round(peak / mib, 1)}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) if n > 1 else 0.0
    return my - slope * mx, slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64],
                        help="cube sides to measure (divisible by 16); at least two")
    parser.add_argument("--target", type=int, nargs=3, default=[160, 192, 160], metavar=("H", "W", "D"))
    parser.add_argument("--strategies", nargs="+", default=["igreg", "equal"])
    parser.add_argument("--amp", action="store_true", help="CUDA bf16 autocast's casts (else float32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if len(set(args.sizes)) < 2 or any(s % 16 for s in args.sizes):
        parser.error("--sizes needs at least two different sides, each divisible by 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    target_voxels = args.target[0] * args.target[1] * args.target[2]
    summary = {"target": args.target, "amp": args.amp, "counted": "live tensor storage (max_memory_allocated)"}
    for name in args.strategies:
        rows = []
        for side in sorted(args.sizes):
            torch.manual_seed(0)
            rows.append(measure(name, [side] * 3, args.amp))
            print(json.dumps(rows[-1]), flush=True)
        intercept, slope = fit_line([r["voxels"] for r in rows], [r["step_peak_mib"] for r in rows])
        worst = max(abs(intercept + slope * r["voxels"] - r["step_peak_mib"]) for r in rows)
        summary[name] = {"mib_per_mvoxel": round(slope * 1e6, 1), "intercept_mib": round(intercept, 1),
                         "fit_max_residual_mib": round(worst, 1),
                         "target_peak_gib": round((intercept + slope * target_voxels) / 1024, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
