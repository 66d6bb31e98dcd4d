"""Model I/O demo: build IGRegNet, run one IGReg outer iteration (one surrogate step and one main
step) on a random batch on the CPU, and print the shapes and the six loss terms.

    python -m scripts.model_demo                 # default network, 32^3 input
    python -m scripts.model_demo --demo --size 48
"""

from __future__ import annotations

import argparse
import functools
import time

import lion_pytorch
import torch

from scripts.mtl.igreg import TERMS, IGReg
from scripts.networks import IGRegNet

DEMO_NET = dict(num_channels=8, widths=(16, 32, 64, 64), depths=(1, 1, 1, 1), cardinality=4)


def random_batch(size: int, tasks: int, per_class: int = 1, seed: int = 0) -> dict:
    """A training batch as the loader makes it: per task `per_class` class-0 then class-1 rows
    (labelled for that task only), then one segmentation row with a cubic tumor."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * per_class * tasks
    label = torch.full((n + 1, tasks), -1, dtype=torch.long)
    for t in range(tasks):
        label[2 * per_class * t:2 * per_class * (t + 1), t] = torch.tensor([0] * per_class + [1] * per_class)
    seg = torch.zeros(n + 1, 1, size, size, size)
    lo, hi = size // 4, size // 2
    seg[-1, :, lo:hi, lo:hi, lo:hi] = 1
    has_seg = torch.zeros(n + 1, dtype=torch.bool)
    has_seg[-1] = True
    return {"image": torch.randn(n + 1, 2, size, size, size, generator=gen), "label": label, "seg": seg,
            "has_seg": has_seg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="cube side of the random input (divisible by 16)")
    parser.add_argument("--demo", action="store_true", help="the small CPU demo network instead of the default")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = IGRegNet(**(DEMO_NET if args.demo else {}))
    print(f"IGRegNet: tasks {net.tasks}, {sum(p.numel() for p in net.parameters()):,} parameters")
    batch = random_batch(args.size, len(net.tasks))
    net.eval()
    with torch.no_grad():
        out = net(batch["image"][:2])
    print(f"inference input {tuple(batch['image'][:2].shape)}")
    for name, value in out.items():
        print(f"  output {name}: {tuple(value.shape)}")

    net.train()
    strategy = IGReg(net, functools.partial(lion_pytorch.Lion, lr=1e-4, weight_decay=2e-5), surrogate_steps=1)
    strategy.initialize([batch])
    print(f"training batch: image {tuple(batch['image'].shape)}, label {tuple(batch['label'].shape)}, "
          f"seg {tuple(batch['seg'].shape)}, has_seg {batch['has_seg'].tolist()}")
    start = time.perf_counter()
    logs = strategy.step(batch)
    print(f"one outer iteration (1 surrogate step + 1 main step): {time.perf_counter() - start:.2f} s")
    for name in ("loss", *TERMS):
        print(f"  {name:>13}: {logs[name].item():.4f}")


if __name__ == "__main__":
    main()
