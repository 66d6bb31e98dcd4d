"""Sanity check of the inference saliency maps on labelled cases (fire CLI), run from the bundle folder:

    python -m scripts.saliency_check --models "eval/ablation/igreg/seed_0/models/model.pt,..." \\
        --config_file "configs/inference.yaml,configs/demo.yaml" --split validation

Per model and task, over the split's cases with a tumour mask:

- `pass`: the share of cases whose saliency mass inside the (ground-truth) tumour exceeds the tumour's
  share of the brain by more than `margin` (mass share > volume share + margin), with the mean mass and
  volume shares; `pass_random`: the same for the fully randomised network (what the image alone gives);
- `rho_<stage>`: the mean over cases of Spearman's rank correlation, over the brain's voxels, between
  the map of the trained network and that of the same network with the parameters of a cascading
  randomisation stage re-drawn (heads; classification branch; + neck; all parameters). A map that
  depends on the model has rho well below 1 (Adebayo et al., 2018); a map that ignores it has rho = 1.

Maps are compared on the network's input grid (the preprocessed image; the inference files are the
same maps resampled onto each T1C file's grid). Writes `<output>.csv` (one row per model and task) and
prints a Markdown table: mean ± sample sd over the models (seeds) of each group, and per model.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.checkpoint import load_network_weights
from scripts.cli import run
from scripts.data import load_datalist
from scripts.data.transforms import preprocessing
from scripts.saliency.maps import DEFAULT_LAYER, SaliencyMaps, randomised_copy
from scripts.saliency.sanity import CASCADE, mass_share, rank_correlation

BUNDLE = Path(__file__).resolve().parents[1]


def _as_list(value: Any) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]


def read_configs(config_file: Any, overrides: dict) -> ConfigParser:
    """The configs `config_file` (comma-separated; relative to the bundle folder unless absolute) with
    `overrides`, on the CPU and without loading weights."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) if not Path(f).is_absolute() else f for f in _as_list(config_file)])
    parser.update({"bundle_root": str(BUNDLE), "load_pretrain": False, "device": "$torch.device('cpu')", **overrides})
    return parser


def trained_network(parser: ConfigParser, path: str) -> torch.nn.Module:
    """The configs' network with the weights of checkpoint `path` (settings checked), in eval mode on the CPU."""
    network = parser.get_parsed_content("network_def", instantiate=True, lazy=False).cpu().eval()
    load_network_weights(network, path, "cpu", settings=parser.get_parsed_content("model_settings"))
    return network


def load_cases(parser: ConfigParser, split: str, max_cases: int | None) -> list[dict]:
    """The split's cases with a tumour mask, preprocessed as at inference (image, seg), sorted by id, the
    first `max_cases` of them."""
    datalist = parser.get_parsed_content("datalist")
    raw = sorted((c for c in load_datalist(datalist, split) if c.get("seg")), key=lambda c: str(c["case_id"]))
    raw = raw[:max_cases] if max_cases else raw
    chain = preprocessing(parser["pixdim"], parser["spatial_size"], parser["tasks"])
    return [{"case_id": str(c["case_id"]), **{k: v for k, v in chain(c).items() if k in ("image", "seg")}}
            for c in raw]


def model_label(path: str) -> tuple[str, str]:
    """(group, seed) of `<group>/seed_<k>/models/model.pt`, else (parent folder, file name)."""
    p = Path(path)
    if p.parent.name == "models" and p.parent.parent.name.startswith("seed_"):
        return p.parent.parent.parent.name, p.parent.parent.name.removeprefix("seed_")
    return p.parent.name, p.name


def check_model(network: torch.nn.Module, cases: Sequence[dict], tasks: Sequence[str], method: str,
                margin: float, seed: int = 0, layer: str = DEFAULT_LAYER) -> list[dict]:
    """One row per task: the measures of the module docstring for `network` over `cases`."""
    stages = {name: randomised_copy(network, seed, layers) for name, layers in CASCADE.items()}
    explain = SaliencyMaps(network, tasks, method, layer)
    explain_stage = {name: SaliencyMaps(net, tasks, method, layer) for name, net in stages.items()}
    per_task: dict[str, dict[str, list[float]]] = {t: {} for t in tasks}
    for case in cases:
        x = torch.as_tensor(case["image"]).as_subclass(torch.Tensor)[None].float()
        brain = (x[0, 0] != 0).numpy()
        tumour = torch.as_tensor(case["seg"]).as_subclass(torch.Tensor)[0].numpy()
        trained, _, _ = explain(x)
        randomised = {name: maps(x)[0] for name, maps in explain_stage.items()}
        for task in tasks:
            rec = per_task[task]
            m = trained[task][0, 0].numpy()
            mass, volume = mass_share(m, tumour, brain)
            mass_r, _ = mass_share(randomised["all"][task][0, 0].numpy(), tumour, brain)
            rec.setdefault("mass", []).append(mass)
            rec.setdefault("volume", []).append(volume)
            rec.setdefault("pass", []).append(float(mass > volume + margin) if not math.isnan(mass) else 0.0)
            rec.setdefault("pass_random", []).append(float(mass_r > volume + margin) if not math.isnan(mass_r) else 0.0)
            rec.setdefault("empty", []).append(float(math.isnan(mass)))
            for name in stages:
                rho = rank_correlation(m, randomised[name][task][0, 0].numpy(), brain)
                rec.setdefault(f"rho_{name}", []).append(rho)
    explain.close()
    rows = []
    for task in tasks:
        rec = per_task[task]
        row: dict[str, Any] = {"task": task, "cases": len(cases)}
        for key, values in rec.items():
            finite = [v for v in values if not math.isnan(v)]
            row[key] = float(np.mean(finite)) if finite else math.nan
        row.update({f"rho_{name}_undefined": int(sum(math.isnan(v) for v in rec[f"rho_{name}"])) for name in stages})
        rows.append(row)
    return rows


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


COLUMNS = ("pass", "pass_random", "mass", "volume", *(f"rho_{s}" for s in CASCADE))


def markdown(rows: Sequence[dict], margin: float) -> str:
    """Per group and task, mean ± sd over the group's models; then one line per model and task."""
    head = ("| group | task | models | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (3 + len(COLUMNS)) + "\n")
    lines = []
    groups = sorted({(r["group"], r["task"]) for r in rows}, key=lambda g: (g[0], str(g[1])))
    for group, task in groups:
        sel = [r for r in rows if r["group"] == group and r["task"] == task]
        lines.append(f"| {group} | {task} | {len(sel)} | " + " | ".join(_fmt([r[c] for r in sel]) for c in COLUMNS)
                     + " |")
    per_model = [f"| {r['group']} seed {r['seed']} | {r['task']} | {r['cases']} cases | "
                 + " | ".join(_fmt([r[c]]) for c in COLUMNS) + " |" for r in rows]
    model_head = head.replace("| group | task | models |", "| model | task | cases |")
    return (f"mass share > volume share + {margin:g} = pass\n\n" + head + "\n".join(lines) + "\n\nPer model:\n\n"
            + model_head + "\n".join(per_model) + "\n")


def main(models: Any, config_file: Any = "configs/inference.yaml,configs/demo.yaml", split: str = "validation",
         max_cases: int | None = None, method: str = "gradcam", margin: float = 0.05, threads: int = 1,
         output: str = "saliency_check", seed: int = 0, layer: str = DEFAULT_LAYER, **overrides: Any) -> None:
    """Run the check for every checkpoint in `models` (comma-separated) with the settings of
    `config_file` (+ `overrides`, e.g. --dataset_dir); writes `<output>.csv` and prints the tables."""
    torch.set_num_threads(threads)
    parser = read_configs(config_file, overrides)
    tasks = list(parser["tasks"])
    start = time.time()
    cases = load_cases(parser, split, max_cases)
    rows = []
    for path in _as_list(models):
        network = trained_network(parser, path)
        group, model_seed = model_label(path)
        for row in check_model(network, cases, tasks, method, margin, seed, layer):
            rows.append({"group": group, "seed": model_seed, "method": method, "layer": layer, "margin": margin,
                         **row})
        print(f"{path}: {len(cases)} cases, {time.time() - start:.0f} s so far", flush=True)
    with open(f"{output}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows, margin)
    print(table)
    print(f"{len(_as_list(models))} model(s) x {len(cases)} {split} case(s), {method} on {layer}: "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    run(main)
