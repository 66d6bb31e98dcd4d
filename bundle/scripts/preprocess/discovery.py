"""Raw cases ``{case_id, t1c, t2w[, seg]}`` where each scan is a NIfTI file or a DICOM series folder.

Found under an input folder:

- the layouts inference reads (`scripts.data.discovery`: ``<case>_t1ce|_t1c`` + ``<case>_t2|_t2w``,
  ``<case>/t1c`` + ``<case>/t2w``);
- TCIA-style names in any letter case: ``<case>/T1C.nii.gz`` + ``<case>/T2W.nii.gz``;
- DICOM series folders: ``<case>/T1C/`` + ``<case>/T2W/`` (any letter case), one series each;

or listed in a CSV with columns ``case_id``, ``t1c``, ``t2w`` (and optional ``seg``): files or series folders,
relative paths taken from the CSV's folder. Image files under the input folder that belong to no case are
returned as `unclaimed` folders, for the caller to report."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from scripts.data.discovery import find_cases
from scripts.data.validate import DatalistError

from .io import NIFTI, dicom_series

SERIES_NAMES = {"t1c": "t1c", "t2w": "t2w", "seg": "seg"}  # <case>/<name>.nii.gz or <case>/<name>/ (any case)
IMAGE_SUFFIXES = (*NIFTI, ".dcm", ".ima")


def _named(folder: Path, name: str) -> Path | None:
    """The NIfTI file or DICOM series folder called `name` (any letter case) in `folder`."""
    for child in sorted(folder.iterdir()):
        low = child.name.lower()
        if child.is_file() and any(low == name + e for e in NIFTI):
            return child
        if child.is_dir() and low == name and dicom_series(child):
            return child
    return None


def _is_image_file(path: Path) -> bool:
    if path.name.lower().endswith(IMAGE_SUFFIXES):
        return True
    try:  # a DICOM file without an extension: "DICM" after the 128-byte preamble
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _claims(case: dict[str, str]) -> list[Path]:
    return [Path(v).resolve() for k, v in case.items() if k != "case_id"]


def find_raw_cases(input_dir: str | os.PathLike) -> tuple[list[dict[str, str]], list[str]]:
    """(cases sorted by id, folders holding image files that form no case)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir {root} is not a folder")
    cases = {c["case_id"]: c for c in find_cases(root)}
    for folder in sorted(p for p in [root, *root.rglob("*")] if p.is_dir()):
        found = {k: _named(folder, n) for k, n in SERIES_NAMES.items()}
        if found["t1c"] is None or found["t2w"] is None:
            continue
        case_id = folder.name if folder != root else root.resolve().name
        case = {"case_id": case_id, **{k: str(v) for k, v in found.items() if v is not None}}
        if case_id in cases:
            if set(_claims(cases[case_id])) <= set(_claims(case)):
                continue  # the same case, found by scripts.data.discovery too
            raise DatalistError(case_id, "case_id", f"found twice: {cases[case_id]['t1c']} and {case['t1c']}")
        cases[case_id] = case
    claimed = {p for c in cases.values() for p in _claims(c)}
    unclaimed = set()
    for path in root.rglob("*"):
        resolved = path.resolve()
        if path.is_file() and _is_image_file(path) and not any(c == resolved or c in resolved.parents
                                                               for c in claimed):
            unclaimed.add(str(path.parent))
    return [cases[k] for k in sorted(cases)], sorted(unclaimed)


def read_cases_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The cases a CSV lists (``case_id``, ``t1c``, ``t2w``[, ``seg``]); relative paths from the CSV's folder."""
    path = Path(path)
    base = path.resolve().parent
    cases: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k}
            case_id = row.get("case_id", "")
            for key in ("case_id", "t1c", "t2w"):
                if not row.get(key):
                    raise DatalistError(case_id or f"line {n}", key, f"empty or missing in {path} (line {n})")
            if case_id in cases:
                raise DatalistError(case_id, "case_id", f"listed twice in {path}")
            case = {"case_id": case_id}
            for key in ("t1c", "t2w", "seg"):
                if row.get(key):
                    file = Path(row[key]) if Path(row[key]).is_absolute() else base / row[key]
                    if not file.exists():
                        raise DatalistError(case_id, key, f"{file} does not exist (listed in {path}, line {n})")
                    case[key] = str(file)
            cases[case_id] = case
    return [cases[k] for k in sorted(cases)]
