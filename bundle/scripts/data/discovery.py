"""Turn folders of NIfTI files into cases ``{case_id, t1c, t2w[, seg]}`` (training and inference alike).

Recognised anywhere under a folder (``.nii.gz`` or ``.nii``):

- BraTS / prefixed: ``<case>_t1ce`` (or ``_t1c``) with ``<case>_t2`` (or ``_t2w``) and optional
  ``<case>_seg`` beside it, in a case folder or flat;
- plain: a case folder ``<case>/`` holding ``t1c`` (or ``t1ce``), ``t2w`` (or ``t2``) and optional ``seg``.

Symlinked folders are followed (each real folder once). A folder that holds NIfTI files of which
none belongs to a case (e.g. ``T1C.nii.gz`` or ``t1_gd.nii.gz``) is reported: a warning lists such
folders, and with ``strict`` they are an error.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from .datalist import SEG_KEY
from .validate import DatalistError

NIFTI = (".nii.gz", ".nii")
PREFIXED = {"t1c": ("_t1ce", "_t1c"), "t2w": ("_t2", "_t2w"), SEG_KEY: ("_seg",)}
PLAIN = {"t1c": ("t1c", "t1ce"), "t2w": ("t2w", "t2"), SEG_KEY: ("seg",)}
logger = logging.getLogger(__name__)


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


def _nifti_files(root: Path) -> Iterator[Path]:
    """Every NIfTI file under ``root``, sorted per folder, following symlinked folders (each real folder once)."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            if name.endswith(NIFTI):
                yield Path(folder) / name


def find_cases(folders: str | os.PathLike | Sequence[str | os.PathLike], strict: bool = False) -> list[dict[str, str]]:
    """Every case under ``folders``, sorted by case id. A T1C file without its T2W, or two cases
    with one id, raise a `DatalistError` naming the case and the field. Folders with NIfTI files
    that form no case are listed in a warning (with ``strict``, a `DatalistError`)."""
    roots = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    cases: dict[str, dict[str, str]] = {}
    images: dict[Path, list[Path]] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"not a folder: {root}")
        for path in _nifti_files(root):
            images.setdefault(path.parent, []).append(path)
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
    used = {Path(c[k]).parent for c in cases.values() for k in ("t1c", "t2w", SEG_KEY) if k in c}
    orphans = [folder for folder in images if folder not in used]
    if orphans:
        shown = "; ".join(f"{f} ({', '.join(p.name for p in images[f][:3])}{', ...' if len(images[f]) > 3 else ''})"
                          for f in orphans[:10])
        text = (f"{len(orphans)} folder(s) hold NIfTI files that form no case (expected {_layouts()}): {shown}"
                + (f" and {len(orphans) - 10} more" if len(orphans) > 10 else ""))
        if strict:
            raise DatalistError("*", "data_dir", text)
        logger.warning(text + "; these folders are skipped (--strict true makes this an error)")
    return [cases[k] for k in sorted(cases)]


def _layouts() -> str:
    t1c, t2w = "|".join(PREFIXED["t1c"]), "|".join(PREFIXED["t2w"])
    return (f"<case>{{{t1c}}} + <case>{{{t2w}}}, or a case folder with {{{'|'.join(PLAIN['t1c'])}}} + "
            f"{{{'|'.join(PLAIN['t2w'])}}}")
