"""Registry of fixture sections: a section is a function `(ref, out_dir) -> None` that writes one
fixture file; `@section("name")` registers it (one line). `make_fixtures.py` imports the section
modules listed in its `SECTION_MODULES`, then runs the chosen sections."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict

import numpy as np

Section = Callable[[SimpleNamespace, Path], None]
SECTIONS: Dict[str, Section] = {}
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def section(name: str) -> Callable[[Section], Section]:
    """Register `fn` as the section `name` (writes `fixtures/<name>.npz` by convention)."""
    def register(fn: Section) -> Section:
        if name in SECTIONS:
            raise ValueError(f"fixture section {name!r} registered twice")
        SECTIONS[name] = fn
        return fn
    return register


def save(out_dir: Path, name: str, **arrays) -> Path:
    """Write `<out_dir>/<name>.npz` (compressed); tensors become numpy arrays."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **{k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                                 for k, v in arrays.items()})
    return path


def load(name: str) -> Dict[str, np.ndarray]:
    """A committed fixture as a dict of arrays (used by the tests)."""
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}
