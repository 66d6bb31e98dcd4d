"""Tumour-occlusion test: does each classification head depend on the tumour? (fire CLI, from the bundle folder)

    python -m scripts.occlusion --models "eval/regime/select/lr1e-3_ss1/equal/seed_100/models/model.pt,..." \\
        --config_file "configs/inference.yaml,configs/demo.yaml" --split testing

For every case of the split with a tumour mask, on the network's input (the preprocessed image), each
task's probability of class 1 is compared between the case as it is and two edits of it:

- `tumour`: the ground-truth tumour's voxels replaced, channel by channel, by draws from the case's
  healthy brain (normal, with the mean and standard deviation of the brain's voxels outside the tumour);
- `control`: the same fill over a region of healthy brain of the tumour's shape and size (the tumour
  mirrored or shifted to where it lies best inside healthy brain; the region is kept to its healthy part).

A head that reads the tumour moves more under the first edit than under the second. Per model and task:
the mean |delta p| of each edit over the cases, and the share of cases where the tumour edit moves p more
than the control edit. Writes `<output>.csv` (one row per model and task) and prints a Markdown table:
mean +- sample sd over the models (seeds) of each group (the folder above `seed_<k>`), then per model.
"""

from __future__ import annotations

import csv
import time
from typing import Any, Sequence

import numpy as np
import torch

from scripts.cli import run
from scripts.saliency_check import _as_list, _fmt, load_cases, model_label, read_configs, trained_network

COLUMNS = ("dp_tumour", "dp_control", "tumour_moves_more", "control_in_healthy")


def healthy_fill(image: torch.Tensor, region: torch.Tensor, healthy: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """`image` [C, *S] with the voxels of `region` [*S] drawn per channel from N(mean, sd) of the `healthy` voxels."""
    out = image.clone()
    n = int(region.sum())
    for c in range(image.shape[0]):
        values = image[c][healthy]
        out[c][region] = values.mean() + values.std() * torch.randn(n, generator=gen)
    return out


def control_region(tumour: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A region of healthy brain with the tumour's shape and size: of the tumour mirrored along each axis
    and shifted by a quarter of the volume along each axis, the one with most of its voxels in healthy
    brain, cut to that part. Returns (region, share of the moved tumour inside healthy brain)."""
    healthy = brain & ~tumour
    candidates = [tumour.flip(d) for d in range(tumour.ndim)]
    candidates += [tumour.roll(s * tumour.shape[d] // 4, d) for d in range(tumour.ndim) for s in (-1, 1)]
    shares = [float((c & healthy).sum()) / max(int(c.sum()), 1) for c in candidates]
    best = int(np.argmax(shares))
    return candidates[best] & healthy, shares[best]


@torch.no_grad()
def class1_probabilities(network: torch.nn.Module, x: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
    """P(class 1) per task for a batch [N, C, *S] -> [N, T]."""
    out = network(x)
    return torch.stack([out[t].float().softmax(1)[:, 1] for t in tasks], 1)


def occlude_model(network: torch.nn.Module, cases: Sequence[dict], tasks: Sequence[str], seed: int = 0) -> list[dict]:
    """One row per task: the measures of the module docstring for `network` over `cases`."""
    dp_tumour, dp_control, inside = [], [], []
    for i, case in enumerate(cases):
        image = torch.as_tensor(case["image"]).as_subclass(torch.Tensor).float()
        tumour = torch.as_tensor(case["seg"]).as_subclass(torch.Tensor)[0] > 0.5
        brain = (image != 0).any(0)
        if not tumour.any():
            continue
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        control, share = control_region(tumour, brain)
        healthy = brain & ~tumour
        edits = [healthy_fill(image, tumour, healthy, gen), healthy_fill(image, control, healthy, gen)]
        batch = torch.stack([image, *edits])
        p = class1_probabilities(network, batch, tasks)
        dp_tumour.append((p[1] - p[0]).abs())
        dp_control.append((p[2] - p[0]).abs())
        inside.append(share)
    t, c = torch.stack(dp_tumour), torch.stack(dp_control)
    return [{"task": task, "cases": len(inside), "dp_tumour": float(t[:, k].mean()),
             "dp_control": float(c[:, k].mean()), "tumour_moves_more": float((t[:, k] > c[:, k]).float().mean()),
             "control_in_healthy": float(np.mean(inside))} for k, task in enumerate(tasks)]


def markdown(rows: Sequence[dict]) -> str:
    """Per group and task, mean +- sd over the group's models; then one line per model and task."""
    head = "| group | task | models | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (3 + len(COLUMNS)) + "\n"
    lines = []
    for group, task in sorted({(r["group"], r["task"]) for r in rows}):
        sel = [r for r in rows if r["group"] == group and r["task"] == task]
        lines.append(f"| {group} | {task} | {len(sel)} | " + " | ".join(_fmt([r[c] for r in sel], 3) for c in COLUMNS)
                     + " |")
    per_model = [f"| {r['group']} seed {r['seed']} | {r['task']} | {r['cases']} cases | "
                 + " | ".join(_fmt([r[c]], 3) for c in COLUMNS) + " |" for r in rows]
    return head + "\n".join(lines) + "\n\nPer model:\n\n" + head.replace("| models |", "| cases |") + \
        "\n".join(per_model) + "\n"


def main(models: Any, config_file: Any = "configs/inference.yaml,configs/demo.yaml", split: str = "testing",
         max_cases: int | None = None, threads: int = 1, output: str = "occlusion", seed: int = 0,
         group_depth: int = 1, **overrides: Any) -> None:
    """Run the test for every checkpoint in `models` (comma-separated) with the settings of `config_file`
    (+ `overrides`, e.g. --dataset_dir); writes `<output>.csv` and prints the tables. `group_depth` folders
    above `seed_<k>` name a model's group (2: e.g. `lr1e-3_ss1/equal`)."""
    torch.set_num_threads(threads)
    parser = read_configs(config_file, overrides)
    tasks = list(parser["tasks"])
    start = time.time()
    cases = load_cases(parser, split, max_cases)
    rows = []
    for path in _as_list(models):
        network = trained_network(parser, path)
        group, model_seed = model_label(path)
        if group_depth > 1:
            parts = path.split("/")
            group = "/".join(parts[-3 - group_depth:-3])
        rows += [{"group": group, "seed": model_seed, **row} for row in occlude_model(network, cases, tasks, seed)]
        print(f"{path}: {len(cases)} cases, {time.time() - start:.0f} s so far", flush=True)
    with open(f"{output}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(markdown(rows))
    print(f"{len(_as_list(models))} model(s) x {len(cases)} {split} case(s): {time.time() - start:.0f} s")


if __name__ == "__main__":
    run(main)
