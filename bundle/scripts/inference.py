"""Inference on new cases: input discovery, output-folder safety, prediction post-processing and writers."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from scripts.data import find_cases, load_datalist

logger = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    """The output folder already holds predictions of an earlier run."""


def output_name(case: Mapping[str, Any]) -> str:
    """File-name stem of a case's outputs: its `case_id` with path separators replaced."""
    return str(case["case_id"]).replace("/", "_").replace(os.sep, "_")


def mask_path(output_dir: str | os.PathLike, case: Mapping[str, Any]) -> Path:
    """Where the predicted mask of a case goes: `<output name>_seg.nii.gz` (see `CaseFilenamed`)."""
    return Path(output_dir) / f"{output_name(case)}_seg.nii.gz"


def inference_cases(datalist: str | None = None, input_dir: str | None = None, split: str = "testing",
                    base_dir: str | None = None) -> list[dict]:
    """Cases to predict: every case found in `input_dir` if given, else the `split` list of a datalist JSON."""
    if input_dir:
        return [{k: c[k] for k in ("case_id", "t1c", "t2w")} for c in find_cases(input_dir)]
    if datalist:
        return [{k: c[k] for k in ("case_id", "t1c", "t2w")} for c in load_datalist(datalist, split, base_dir)]
    raise ValueError("give either `datalist` (a JSON with a 'testing' list) or `input_dir` (a folder of cases)")


def prepare_output_dir(output_dir: str, cases: Sequence[Mapping[str, Any]], overwrite: bool = False) -> str:
    """Refuse an output folder holding an earlier run's predictions (unless `overwrite`) and any
    output path that would replace an input file. Returns the folder, created."""
    out = Path(output_dir).resolve()
    inputs = {Path(str(c[k])).resolve() for c in cases for k in ("t1c", "t2w") if k in c}
    for c in cases:
        for target in (out / f"{output_name(c)}.json", mask_path(out, c).resolve()):
            if target in inputs:
                raise OutputExistsError(f"case {c['case_id']!r}: output {target} would overwrite an input file")
    previous = [p for p in (out / "predictions.csv",) if p.exists()]
    if previous and not overwrite:
        raise OutputExistsError(f"{out} holds an earlier run's results ({previous[0].name}); "
                                "choose another output_dir or set overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    return str(out)


class SplitPredictiond(MapTransform):
    """Turn the network's dict output under `pred` into `pred` = segmentation logits and
    `probs` = {task: class probabilities}."""

    def __init__(self, keys: str = "pred", seg_key: str = "seg") -> None:
        super().__init__(keys)
        self.seg_key = seg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            out = d[key]
            d["probs"] = {t: v.float().softmax(-1) for t, v in out.items() if t != self.seg_key}
            d[key] = out[self.seg_key]
        return d


class CaseFilenamed(MapTransform):
    """Name the MetaTensors under `keys` after the case (`output_name`), so that SaveImaged writes
    `<case_id>_<postfix>` and cases whose files share a name (e.g. `<case>/t1c.nii.gz`) stay apart."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key].meta["filename_or_obj"] = output_name(d)
        return d


class PredictionWriter:
    """Writes `<case>.json` (probability and class per task) per case and `predictions.csv` for all."""

    def __init__(self, output_dir: str, tasks: Sequence[str], class_names: Mapping[str, Sequence[str]] | None = None,
                 filename: str = "predictions.csv") -> None:
        self.output_dir, self.tasks = Path(output_dir), list(tasks)
        self.class_names = dict(class_names or {})
        self.csv_path = self.output_dir / filename
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_cases)
        engine.add_event_handler(Events.COMPLETED, self.write_table)

    def write_cases(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            case_id = str(item["case_id"])
            result: dict[str, Any] = {"case_id": case_id}
            for task in self.tasks:
                probs = torch.as_tensor(out["probs"][task]).detach().cpu()
                cls = int(probs.argmax())
                names = self.class_names.get(task)
                result[task] = {"probabilities": [round(float(p), 6) for p in probs], "class": cls,
                                **({"class_name": names[cls]} if names else {})}
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / f"{output_name(item)}.json", "w") as f:
                json.dump(result, f, indent=2)
            self.rows.append({"case_id": case_id,
                              **{f"{t}_prob": result[t]["probabilities"][-1] for t in self.tasks},
                              **{f"{t}_class": result[t]["class"] for t in self.tasks}})

    def write_table(self, engine: Engine) -> None:
        rows = [r for part in idist.all_gather(self.rows) for r in part] if idist.get_world_size() > 1 else self.rows
        if idist.get_rank() != 0 or not rows:
            return
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: r["case_id"]))
        logger.info(f"{len(rows)} predictions written to {self.output_dir}")
