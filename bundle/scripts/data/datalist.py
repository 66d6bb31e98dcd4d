"""The datalist: a decathlon-style JSON of glioma cases, and how it is read and written.

A case is ``{"t1c": path, "t2w": path}`` plus, optionally, ``"seg": path`` (tumor mask, any label > 0
is tumor), any of the task labels (``"1p19q"``, ``"idh"``, ``"grade"``: 0 or 1) and ``"case_id"``.
Relative paths are relative to ``base_dir`` (by default the folder holding the JSON).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

TASKS: tuple[str, ...] = ("1p19q", "idh", "grade")
IMAGE_KEYS: tuple[str, ...] = ("t1c", "t2w")
SEG_KEY = "seg"
PATH_KEYS: tuple[str, ...] = (*IMAGE_KEYS, SEG_KEY)
SPLITS: tuple[str, ...] = ("training", "validation", "testing")
logger = logging.getLogger(__name__)


def case_name(case: Mapping[str, Any], position: int) -> str:
    """The case's id (a number such as 0 as its text), or, when it has none or an empty one, a stand-in
    derived from its T1C file name or its position (an empty id is warned about, naming the stand-in)."""
    given = case.get("case_id")
    if given is not None and str(given).strip():
        return str(given)
    name = _stand_in(case, position)
    if given is not None:
        logger.warning(f"case #{position} has an empty case_id ({given!r}); it is called {name!r} instead")
    return name


def _stand_in(case: Mapping[str, Any], position: int) -> str:
    t1c = case.get("t1c")
    if isinstance(t1c, str) and t1c:
        name = Path(t1c).name
        for suffix in (".nii.gz", ".nii"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        parent = Path(t1c).parent.name
        return f"{parent}/{name}" if parent else name
    return f"#{position}"


class DatalistFileError(ValueError):
    """A datalist file that cannot be read as a datalist (not JSON, not an object); names the file."""


def read_datalist(datalist: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The datalist as a dict: loads a JSON path, passes a mapping through."""
    if isinstance(datalist, Mapping):
        return dict(datalist)
    try:
        with open(datalist, encoding="utf-8-sig") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise DatalistFileError(f"datalist {os.fspath(datalist)} is not valid JSON (line {err.lineno}, column "
                                f"{err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DatalistFileError(f"datalist {os.fspath(datalist)} is not a UTF-8 JSON text file") from None
    if not isinstance(content, dict):
        raise DatalistFileError(f"datalist {os.fspath(datalist)}: expected a JSON object with "
                                f"{'/'.join(SPLITS)} lists, got a {type(content).__name__}")
    return content


KNOWN_KEYS = frozenset({"case_id", *PATH_KEYS, *TASKS})
_HINTS = {"label": SEG_KEY, "mask": SEG_KEY, "segmentation": SEG_KEY, "seg_path": SEG_KEY, "t1ce": "t1c",
          "t1": "t1c (the contrast-enhanced T1)", "t2": "t2w", "flair": "nothing (FLAIR is not used)",
          "image": "t1c and t2w", "id": "case_id", "name": "case_id", "1p/19q": "1p19q", "codeletion": "1p19q"}


def key_hint(key: str) -> str:
    """`; did you mean ...?` for an unknown case key, or an empty string."""
    low = key.strip().lower()
    if low in KNOWN_KEYS:
        return f"; did you mean '{low}'? (keys are case-sensitive)"
    return f"; did you mean '{_HINTS[low]}'?" if low in _HINTS else ""


def resolve_case(case: Mapping[str, Any], base_dir: str | os.PathLike, position: int) -> dict[str, Any]:
    """A copy of ``case`` with absolute paths, a ``case_id``, and ``null`` labels dropped."""
    out = {k: v for k, v in case.items() if v is not None}
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            out[key] = os.path.normpath(os.path.join(base_dir, value))
    out["case_id"] = case_name(case, position)
    return out


def load_datalist(datalist: str | os.PathLike | Mapping[str, Any], split: str = "training",
                  base_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The cases of one split with absolute paths and a ``case_id`` each (empty if the split is absent).

    Args:
        datalist: path of the JSON file, or its content.
        split: ``training``, ``validation`` or ``testing``.
        base_dir: folder that relative paths start from; default the JSON file's folder
            (the current folder for a mapping).
    """
    content = read_datalist(datalist)
    if base_dir is None:
        base_dir = Path(datalist).parent if not isinstance(datalist, Mapping) else Path.cwd()
    cases = content.get(split) or []
    if not isinstance(cases, list):
        raise ValueError(f"datalist split '{split}' must be a list of cases")
    return [resolve_case(c, base_dir, i) if isinstance(c, Mapping) else c for i, c in enumerate(cases)]


def write_datalist(path: str | os.PathLike, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                   **extra: Any) -> str:
    """Write ``splits`` (plus any extra top-level entries) as a datalist JSON; returns the path. The file is
    replaced atomically (a uniquely named temporary file, removed if the write fails, e.g. on a full disk)."""
    content = {**extra, **{name: [dict(c) for c in splits.get(name, [])] for name in SPLITS}}
    path = Path(path)
    text = json.dumps(content, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DatalistFileError(f"cannot write the datalist {path} in {path.parent}: {err.strerror or err} "
                                f"({len(text.encode()) / 1e3:.1f} kB needed)") from None
    return str(path)


def datalist_fingerprint(datalist: str | os.PathLike | Mapping[str, Any], splits: Sequence[str],
                         base_dir: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """{split: {case_id: SHA-256 of the case's fields (paths, labels)}} of ``splits``: what a resumed
    training compares to tell an added, removed or changed case."""
    out: dict[str, dict[str, str]] = {}
    for split in dict.fromkeys(splits):
        cases = load_datalist(datalist, split, base_dir)
        out[split] = {str(c["case_id"]): hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()
                                                        ).hexdigest()[:16]
                      for c in cases if isinstance(c, Mapping)}
    return out


def datalist_changes(saved: Mapping[str, Mapping[str, str]], current: Mapping[str, Mapping[str, str]]) -> list[str]:
    """What differs between two `datalist_fingerprint`s, per split: cases added, removed, changed."""
    lines = []
    for split in sorted(set(saved) | set(current)):
        old, new = dict(saved.get(split, {})), dict(current.get(split, {}))
        parts = []
        for what, names in (("added", [n for n in new if n not in old]), ("removed", [n for n in old if n not in new]),
                            ("changed", [n for n in new if n in old and new[n] != old[n]])):
            if names:
                parts.append(f"{len(names)} {what} ({', '.join(repr(n) for n in sorted(names)[:3])}"
                             f"{', ...' if len(names) > 3 else ''})")
        if parts:
            lines.append(f"{split}: {', '.join(parts)}")
    return lines
