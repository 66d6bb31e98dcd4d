"""T1C -> atlas affine registration (antspyx), the authors' `Affine` by default, `AffineFast` as an option.

The default atlas is the skull-stripped SRI24 T1 (Rohlfing et al., Hum Brain Mapp 2010; CC BY-SA 3.0, see
``sri24/NOTICE``), the space the authors' preprocessing and the BraTS data use."""
from __future__ import annotations

from pathlib import Path

import ants

from .coregister import register

DEFAULT_ATLAS = Path(__file__).resolve().parent / "sri24" / "sri24_t1_brain.nii.gz"


def load_atlas(path: str | None = None) -> ants.ANTsImage:
    """The atlas image: `path` (a user's own skull-stripped T1 template) or the shipped SRI24."""
    path = Path(path) if path else DEFAULT_ATLAS
    if not path.is_file():
        raise FileNotFoundError(f"atlas {path} not found")
    return ants.image_read(str(path), pixeltype="float")


def to_atlas(t1c_brain: ants.ANTsImage, atlas: ants.ANTsImage, out_path: Path, transform: str = "Affine") -> Path:
    """The affine taking the skull-stripped T1C onto the atlas, started from the centres of mass
    (the scanner's origin says nothing about where the atlas lies)."""
    return register(atlas, t1c_brain, transform, out_path, initial=None)
