"""Turn folders of NIfTI files into cases ``{case_id, t1c, t2w[, seg]}`` (training and inference alike).

Recognised anywhere under a folder (``.nii.gz`` or ``.nii``):

- BraTS / prefixed: ``<case>_t1ce`` (or ``_t1c``) with ``<case>_t2`` (or ``_t2w``) and optional
  ``<case>_seg`` beside it, in a case folder or flat;
- plain: a case folder ``<case>/`` holding ``t1c``, ``t2w`` and optional ``seg``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .datalist import SEG_KEY
from .validate import DatalistError

NIFTI = (".nii.gz", ".nii")
PREFIXED = {"t1c": ("_t1ce", "_t1c"), "t2w": ("_t2", "_t2w"), SEG_KEY: ("_seg",)}
PLAIN = {"t1c": ("t1c",), "t2w": ("t2w",), SEG_KEY: ("seg",)}


def _nifti_stem(path: Path) -> str | None:
    return next((path.name[: -len(e)] for e in NIFTI if path.name.endswith(e)), None)


def _beside(t1c: Path, names: Sequence[str]) -> Path | None:
    """The first existing file ``<name><ext>`` in the T1C file's folder."""
    return next((t1c.with_name(n + e) for n in names for e in NIFTI if t1c.with_name(n + e).is_file()), None)


def _case_of(t1c: Path) -> tuple[str, dict[str, tuple[str, ...]]] | None:
    """(case id, file names of the other fields) when ``t1c`` is a T1C file of a known layout."""
    stem = _nifti_stem(t1c)
    if stem is None:
        return None
    if stem in PLAIN["t1c"]:
        return t1c.parent.name, PLAIN
    for suffix in PREFIXED["t1c"]:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            case = stem[: -len(suffix)]
            return case, {k: tuple(case + s for s in v) for k, v in PREFIXED.items()}
    return None


def find_cases(folders: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """Every case under ``folders``, sorted by case id. A T1C file without its T2W, or two cases
    with one id, raise a `DatalistError` naming the case and the field."""
    roots = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    cases: dict[str, dict[str, str]] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"not a folder: {root}")
        for path in sorted(root.rglob("*.nii*")):
            found = _case_of(path)
            if found is None:
                continue
            case, names = found
            t2w = _beside(path, names["t2w"])
            if t2w is None:
                raise DatalistError(case, "t2w", f"no {' or '.join(names['t2w'])}(.nii.gz|.nii) beside {path}")
            if case in cases:
                raise DatalistError(case, "case_id", f"found twice: {cases[case]['t1c']} and {path}")
            seg = _beside(path, names[SEG_KEY])
            cases[case] = {"case_id": case, "t1c": str(path), "t2w": str(t2w), **({SEG_KEY: str(seg)} if seg else {})}
    return [cases[k] for k in sorted(cases)]
