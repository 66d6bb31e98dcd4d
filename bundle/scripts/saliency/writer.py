"""The saliency run's writer: per case the maps (NIfTI, on the T1C file's grid) and the PNG report,
and `index.html` for the run. Attached after `PredictionWriter`, whose `<name>.json` it reads, so
the report and the page show exactly the probabilities written (a case without one is skipped)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine, Events

from scripts.inference import (
    INDEX,
    json_path,
    mask_path,
    report_path,
    saliency_path,
    save_volume,
    write_output,
)

from .index import index_row, write_index
from .report import write_report
from .transforms import VIEW_KEY, saliency_key

logger = logging.getLogger(__name__)


class SaliencyWriter:
    """Per case `<name>_saliency_<task>.nii.gz` and `<name>_report.png`; `index.html` at the end. Every
    file is recorded in the run's manifest with its hash (so `--overwrite` removes it while unchanged)."""

    def __init__(self, output_dir: str, tasks: Sequence[str], class_names: Mapping[str, Sequence[str]] | None = None,
                 method: str = "gradcam") -> None:
        self.output_dir, self.tasks = Path(output_dir), list(tasks)
        self.class_names = dict(class_names or {})
        self.method = method
        self.rows: list[tuple[str, str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_cases)
        engine.add_event_handler(Events.COMPLETED, self.write_index)

    def write_cases(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            probs_file = json_path(self.output_dir, item)
            if not probs_file.is_file():  # no prediction for this case (reported by PredictionWriter)
                continue
            result = json.loads(probs_file.read_text())
            for task in self.tasks:
                save_volume(saliency_path(self.output_dir, item, task), out[saliency_key(task)], np.float32)
            view = out[VIEW_KEY]
            report = report_path(self.output_dir, item)
            write_output(report, lambda p: write_report(
                p, view["image"], view["mask"], view["maps"], {t: result[t]["probabilities"] for t in self.tasks},
                self.class_names, title=str(item["case_id"]), method=self.method))
            files = [(probs_file.name, "probabilities (JSON)"), (mask_path("", item).name, "mask (NIfTI)")]
            files += [(saliency_path("", item, t).name, f"{t} saliency (NIfTI)") for t in self.tasks]
            self.rows.append((str(item["case_id"]), index_row(str(item["case_id"]), report.name,
                                                              {t: result[t] for t in self.tasks}, files)))

    def write_index(self, engine: Engine) -> None:
        rows = [r for part in idist.all_gather(self.rows) for r in part] if idist.get_world_size() > 1 else self.rows
        if idist.get_rank() != 0:
            return
        path = self.output_dir / INDEX
        write_output(path, lambda p: write_index(p, [html for _, html in sorted(rows)]))
        logger.info(f"saliency maps and reports of {len(rows)} case(s) in {self.output_dir}; overview: {path}")


def saliency_handlers(enabled: bool, output_dir: str, tasks: Sequence[str],
                      class_names: Mapping[str, Sequence[str]] | None = None, method: str = "gradcam") -> list:
    """[SaliencyWriter] when `enabled` (``--saliency``), else []: the handlers inference.yaml appends."""
    return [SaliencyWriter(output_dir, tasks, class_names, method)] if enabled else []
