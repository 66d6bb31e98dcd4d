"""Build or check a datalist (fire CLI).

Build from case folders plus a CSV of labels, with a seeded, stratified split::

    python -m scripts.prepare_datalist --data_dir /data/cases --labels labels.csv --output datalist.json \\
        [--val_fraction 0.2] [--test_fraction 0.2] [--folds 5 --fold 0] [--seed 0] [--absolute False] \\
        [--strict]

``data_dir`` may be a list (e.g. a classification cohort and a separate segmentation cohort).
Cases are found anywhere below them (see `scripts.data.discovery`):

- BraTS: ``<case>_t1ce.nii.gz``, ``<case>_t2.nii.gz``, optional ``<case>_seg.nii.gz`` (in a case
  folder or flat; ``_t1c`` and ``_t2w`` work too);
- plain: ``<case>/t1c.nii.gz`` (or ``t1ce``), ``t2w.nii.gz`` (or ``t2``), optional ``seg.nii.gz``

(``.nii`` works too; symlinked folders are followed). Folders whose NIfTI files form no case are
listed in a warning, and with ``--strict`` they are an error. The CSV has a ``case_id`` column (the
folder name) and any of the task columns ``1p19q``, ``idh``, ``grade`` with 0, 1 or empty (unknown).
Column names are matched without regard to case, spaces or punctuation (``Case ID``, ``1p/19q``); the
separator may be ``,``, ``;`` or a tab; UTF-8 (with or without Excel's byte-order mark) and UTF-16 are
read. ``--output`` never replaces an input, nor an existing file without ``--overwrite``. With
``folds`` > 1 the testing split is set aside first, then ``fold`` of the rest is the validation split.

Check an existing datalist (every file read, every label checked; every bad case is listed, and
the exit status is non-zero when there is one)::

    python -m scripts.prepare_datalist --check datalist.json [--base_dir DIR]
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scripts.cli import run
from scripts.data.datalist import SEG_KEY, TASKS, write_datalist
from scripts.data.discovery import find_cases
from scripts.data.validate import DatalistError, validate_datalist

GOLDEN = 0.6180339887498949
logger = logging.getLogger(__name__)


def _column_key(name: str) -> str:
    """A column name without case, spaces or punctuation: ``Case ID`` -> ``caseid``, ``1p/19q`` -> ``1p19q``."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _labels_text(path: str) -> str:
    """The text of a labels CSV: UTF-16 (by its byte-order mark) or UTF-8 (Excel's BOM ignored)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DatalistError("*", "labels", f"cannot read the labels CSV {path}: {err.strerror or err}") from None
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise DatalistError("*", "labels", f"{path}: the labels CSV is not UTF-8 or UTF-16 text ({err.reason} at byte "
                                           f"{err.start}); save it as CSV UTF-8") from None


def read_labels(path: str, tasks: Sequence[str] = TASKS) -> dict[str, dict[str, int]]:
    """Labels per case id from a CSV (``case_id`` column, task columns with 0/1/empty).

    Column names are matched without regard to case, spaces or punctuation (``IDH``, ``Case ID``,
    ``1p/19q``), the separator is ``,``, ``;`` or a tab (read from the header line), UTF-8 (a byte-order
    mark, as Excel writes, is ignored) and UTF-16 are read, unknown columns are warned about, and a case
    listed twice with different labels is refused (twice with the same labels is accepted). Problems
    raise a `DatalistError` naming the file."""
    labels: dict[str, dict[str, int]] = {}
    text = _labels_text(path)
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DatalistError("*", "labels", f"{path}: the labels CSV is empty (a 'case_id' column and task "
                                           "columns expected)")
    columns = [_column_key(h) for h in header]
    keys = {_column_key(t): t for t in ("case_id", *TASKS)}
    columns = [keys.get(c, c) for c in columns]
    if "case_id" not in columns:
        raise DatalistError("*", "case_id", f"{path}: the labels CSV needs a 'case_id' column, has {header} "
                                            f"(separator {delimiter!r})")
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DatalistError("*", "labels", f"{path}: column(s) {twice} appear twice (names compared without "
                                           "regard to case, spaces or punctuation)")
    unknown = [h for h, c in zip(header, columns) if c not in ("case_id", *TASKS) and c]
    if unknown:
        logger.warning(f"{path}: column(s) {unknown} are not task labels and are ignored "
                       f"(task columns: {', '.join(tasks)}; names are compared without case, spaces or "
                       "punctuation)")
    index = {c: i for i, c in enumerate(columns)}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cell = (lambda name: row[index[name]].strip() if index[name] < len(row) else "")
        case = cell("case_id")
        if not case:
            raise DatalistError("*", "case_id", f"{path}, line {line}: empty case_id")
        found: dict[str, int] = {}
        for task in tasks:
            value = cell(task) if task in index else ""
            if value == "":
                continue
            if value not in ("0", "1", "0.0", "1.0"):
                raise DatalistError(case, task, f"label must be 0, 1 or empty in {path}, got {value!r}")
            found[task] = int(float(value))
        if case in labels and labels[case] != found:
            raise DatalistError(case, "case_id", f"listed twice in {path} with different labels: "
                                                 f"{labels[case]} and {found} (line {line})")
        labels[case] = found
    return labels


def assign_splits(cases: Sequence[dict[str, Any]], tasks: Sequence[str], val_fraction: float,
                  test_fraction: float, folds: int, fold: int, seed: int) -> list[str]:
    """A split name per case, stratified by (labels, has mask), seeded.

    Cases are grouped by stratum, shuffled within it, and walked in that order; a low-discrepancy
    sequence sends each stratum's cases to the splits in the requested proportions.
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = defaultdict(list)
    for i, case in enumerate(cases):
        strata[(*[case.get(t, -1) for t in tasks], SEG_KEY in case)].append(i)
    order = [i for key in sorted(strata) for i in rng.permutation(strata[key]).tolist()]
    offset = rng.random()
    splits = [""] * len(cases)
    rest = []
    for position, i in enumerate(order):
        u = (offset + position * GOLDEN) % 1.0
        if u < test_fraction:
            splits[i] = "testing"
        elif folds <= 1:
            splits[i] = "validation" if u < test_fraction + val_fraction else "training"
        else:
            rest.append(i)
    for position, i in enumerate(rest):
        splits[i] = "validation" if position % folds == fold else "training"
    return splits


def build(data_dir: str | Sequence[str], labels: str | None = None, output: str = "datalist.json",
          val_fraction: float = 0.2, test_fraction: float = 0.2, folds: int = 0, fold: int = 0, seed: int = 0,
          absolute: bool = False, tasks: Sequence[str] = TASKS, validate: bool = True, overwrite: bool = False,
          strict: bool = False) -> str:
    """Write the datalist of the cases under ``data_dir`` with labels from ``labels``; returns its path.

    ``output`` never replaces an input (the labels CSV, a case's file) and replaces an existing
    file only with ``overwrite``. Folders whose NIfTI files form no case are listed in a warning, or
    (``strict``) refused."""
    if folds > 1 and not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    if not 0 <= val_fraction + test_fraction <= 1:
        raise ValueError("val_fraction + test_fraction must lie in [0, 1]")
    data_dirs = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
    cases = find_cases(data_dirs, strict)
    known = read_labels(labels, tasks) if labels else {}
    missing = sorted(set(known) - {c["case_id"] for c in cases})
    if missing:
        raise DatalistError(missing[0], "case_id", f"in {labels} but no such case folder under {data_dirs}")
    cases = [{**c, **known.get(c["case_id"], {})} for c in cases]
    case_files = [c[k] for c in cases for k in ("t1c", "t2w", SEG_KEY) if k in c]
    check_output(output, [*([labels] if labels else []), *case_files], overwrite)
    root = Path(output).resolve().parent
    for case in cases:
        for key in ("t1c", "t2w", SEG_KEY):
            if key in case and not absolute:
                case[key] = os.path.relpath(Path(case[key]).resolve(), root)
            elif key in case:
                case[key] = str(Path(case[key]).resolve())
    splits: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case, split in zip(cases, assign_splits(cases, tasks, val_fraction, test_fraction, folds, fold, seed)):
        splits[split].append(case)
    path = write_datalist(output, splits, description=f"built by scripts.prepare_datalist from {data_dirs}",
                          split={"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                                 "folds": folds, "fold": fold})
    if validate:
        validate_datalist(path, tasks=tasks)
    return path


def check_output(output: str, inputs: Sequence[str], overwrite: bool = False) -> None:
    """Refuse an ``output`` that is one of ``inputs``, or an existing file without ``overwrite``."""
    target = Path(output).resolve()
    if target in {Path(p).resolve() for p in inputs}:
        raise FileExistsError(f"--output {output} is an input file; choose another name")
    if target.exists() and not overwrite:
        raise FileExistsError(f"--output {output} exists; choose another name or add --overwrite")
    if target.exists() and not target.is_file():
        raise FileExistsError(f"--output {output} is not a file")


def report(datalist: str, base_dir: str | None = None) -> dict[str, Any]:
    """Every problem of a datalist (not only the first), its warnings and its per-split summary."""
    errors: list[DatalistError] = []
    warnings: list[str] = []
    summary = validate_datalist(datalist, base_dir=base_dir, errors=errors, warnings=warnings)
    return {"datalist": str(datalist), "ok": not errors, **summary,
            "errors": [{"split": e.split, "case": e.case, "field": e.field, "problem": e.problem} for e in errors],
            "warnings": warnings}


def main(data_dir: str | Sequence[str] | None = None, labels: str | None = None, output: str = "datalist.json",
         val_fraction: float = 0.2, test_fraction: float = 0.2, folds: int = 0, fold: int = 0, seed: int = 0,
         absolute: bool = False, check: str | None = None, base_dir: str | None = None,
         overwrite: bool = False, strict: bool = False) -> None:
    """Build a datalist from ``data_dir`` (and ``labels``), or with ``check`` validate one; print
    its per-split summary with every error and warning. Exits non-zero when there are errors."""
    if check is not None:
        path = check
    elif data_dir is None:
        raise SystemExit("give --data_dir (to build) or --check DATALIST (to validate)")
    else:
        path = build(data_dir, labels, output, val_fraction, test_fraction, folds, fold, seed, absolute,
                     validate=False, overwrite=overwrite, strict=strict)
    result = report(path, base_dir if check is not None else None)
    print(json.dumps(result, indent=1))
    if not result["ok"]:
        raise SystemExit(f"{len(result['errors'])} problem(s) in {path}; the first: "
                         + str(DatalistError(**{k: result["errors"][0][k] for k in ("case", "field", "problem",
                                                                                    "split")})))


if __name__ == "__main__":
    run(main)
