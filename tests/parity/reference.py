"""Import the authors' reference implementation on a CPU, for the fixture generator only.

The reference lives beside the repository (`<repo>/../shared/reference/IGReg/IGReg`, or the folder
named by the environment variable `IGREG_REFERENCE`). It is run unchanged: the three shims it needs
on a CPU are applied from the outside (see `apply_cpu_shims`). Tests never import this module.
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "IGREG_REFERENCE"
DPA_SIZE = [160, 192, 160]  # the size the reference's DPA upsamples to, hard-coded there


def reference_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder of the reference code: `path`, else $IGREG_REFERENCE, else `<repo>/../shared/reference/IGReg/IGReg`."""
    chosen = path or os.environ.get(ENV_VAR) or REPO.parent / "shared" / "reference" / "IGReg" / "IGReg"
    return Path(chosen).resolve()


def available(path: str | os.PathLike | None = None) -> bool:
    return (reference_dir(path) / "model" / "IGReg.py").is_file()


def _identity_cuda(self, *args, **kwargs):
    return self


def apply_cpu_shims() -> None:
    """Identity `.cuda()` for tensors and modules; a stub for the numba soft-DTW module."""
    torch.Tensor.cuda = _identity_cuda
    torch.nn.Module.cuda = _identity_cuda
    stub = types.ModuleType("model.kmeans_pytorch.soft_dtw_cuda")
    stub.SoftDTW = None
    sys.modules["model.kmeans_pytorch.soft_dtw_cuda"] = stub


@contextmanager
def dpa_size(size: Sequence[int]) -> Iterator[None]:
    """Within the block, an interpolation to the reference's hard-coded [160, 192, 160] goes to `size`."""
    original = F.interpolate

    def interpolate(input, size_=None, *args, **kwargs):
        target = kwargs.pop("size", size_)
        if target is not None and list(target) == DPA_SIZE:
            target = list(size)
        return original(input, target, *args, **kwargs)

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


def load(path: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """The reference's modules (`IGReg`, `Backbone_IGReg`, `IGReg_utiles`, `loss_utiles`), shims applied."""
    root = reference_dir(path)
    if not available(root):
        raise FileNotFoundError(f"reference code not found at {root}; set ${ENV_VAR} or pass its folder")
    apply_cpu_shims()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from model import IGReg, IGReg_utiles, loss_utiles  # noqa: E402  (the reference's own package)
    from model.Backbone.IGReg import Backbone_IGReg

    return types.SimpleNamespace(IGReg=IGReg.IGReg, Backbone_IGReg=Backbone_IGReg, IGReg_utiles=IGReg_utiles,
                                 loss_utiles=loss_utiles, root=root)
