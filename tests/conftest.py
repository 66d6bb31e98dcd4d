"""Shared test setup: make the bundle's `scripts` package importable and keep torch small."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no busy-waiting threads on a loaded 2-core machine

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(BUNDLE))
torch.set_num_threads(1)  # a second OpenMP thread mostly waits for a core on a shared 2-core machine

TINY_NET = dict(num_channels=4, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), cardinality=4)  # IGRegNet kwargs


@pytest.fixture
def brats_case() -> dict:
    """Paths of the real BraTS 2021 case shipped beside the project (skips when absent)."""
    case = SHARED_DATA / "brats2021_00000"
    if not case.is_dir():
        pytest.skip("shared BraTS case not available")
    return {k: str(case / f"BraTS2021_00000_{s}.nii.gz") for k, s in
            {"t1c": "t1ce", "t2w": "t2", "seg": "seg", "t1": "t1", "flair": "flair"}.items()}
