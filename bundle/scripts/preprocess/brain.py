"""Brain extraction of the T1C with deepbet (its two small networks ship inside its wheel: no download, CPU)."""
from __future__ import annotations

import functools

import ants
import nibabel as nib
import numpy as np

from .io import ras_affine


@functools.lru_cache(maxsize=1)
def _extractor():  # loaded once per process (about 17 MB of TorchScript)
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def brain_mask(t1c: ants.ANTsImage, threshold: float = 0.5) -> ants.ANTsImage:
    """The brain mask (1 inside, 0 outside) of a T1C on its own grid."""
    image = nib.Nifti1Image(t1c.numpy().astype(np.float32), ras_affine(t1c))
    _, mask, _ = _extractor().run(image, threshold=threshold)
    data = np.asarray(mask.dataobj) > 0
    if not data.any():
        raise ValueError("brain extraction found no brain in the T1C")
    return t1c.new_image_like(data.astype(np.float32))
