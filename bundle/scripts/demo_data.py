"""Make the synthetic demo cohort (fire CLI).

    python -m scripts.demo_data --output_dir demo_data [--seed 0] [--n_train_cls 150] [--n_train_seg 40]
        [--n_val 40] [--n_test 40] [--spacing 4.0] [--noise_rate 0.05] [--num_workers 2]
        [--overwrite False]

Prints the datalist path. See ``scripts.data.demo_cohort`` for the label rules.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from scripts.cli import run
from scripts.data.demo_cohort import DATALIST_NAME, MANIFEST_NAME, ensure_demo_cohort


def main(output_dir: str = "demo_data", seed: int = 0, n_train_cls: int = 150, n_train_seg: int = 40,
         n_val: int = 40, n_test: int = 40, spacing: float = 4.0, noise_rate: float = 0.05,
         num_workers: int = 2, overwrite: bool = False) -> str:
    """Generate the cohort into ``output_dir``, which must be empty or absent, or hold an earlier
    demo cohort and ``overwrite`` be set."""
    folder = Path(output_dir)
    if (folder / DATALIST_NAME).exists():
        if not overwrite:
            raise SystemExit(f"{folder} already holds a datalist; pass --overwrite to make the cohort again")
        if not (folder / MANIFEST_NAME).exists():
            raise SystemExit(f"{folder} holds a datalist that is not a demo cohort; not overwriting it")
        shutil.rmtree(folder)
    return ensure_demo_cohort(output_dir, seed=seed, n_train_cls=n_train_cls, n_train_seg=n_train_seg,
                              n_val=n_val, n_test=n_test, spacing=spacing, noise_rate=noise_rate,
                              num_workers=num_workers)


if __name__ == "__main__":
    run(main)
