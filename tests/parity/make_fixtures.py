"""Generate the parity fixtures from the reference implementation (run by hand, CPU, seeded):

    OMP_NUM_THREADS=1 python tests/parity/make_fixtures.py [--reference DIR] [--only NAME ...]

The reference is found at `<repo>/../shared/reference/IGReg/IGReg` unless `--reference` or
$IGREG_REFERENCE names another folder. Each registered section writes one small
`tests/parity/fixtures/<name>.npz`; the tests read only those files. To add sections, write a
module with functions decorated by `@registry.section("name")` and list it in `SECTION_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))                  # tests/: the `parity` package
sys.path.insert(0, str(HERE.parents[1] / "bundle"))

import torch  # noqa: E402
from parity import reference, registry  # noqa: E402

SECTION_MODULES = ["parity.sections_network", "parity.sections_stdgp", "parity.sections_dpa"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=None, help="folder of the reference code (holds model/IGReg.py)")
    parser.add_argument("--only", nargs="*", default=None, help="sections to run (default: all)")
    parser.add_argument("--out", default=str(registry.FIXTURES), help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's deprecated upsample calls
    for name in SECTION_MODULES:
        importlib.import_module(name)
    ref = reference.load(args.reference)
    chosen = args.only or list(registry.SECTIONS)
    unknown = sorted(set(chosen) - set(registry.SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {sorted(registry.SECTIONS)}")
    for name in chosen:
        start = time.perf_counter()
        registry.SECTIONS[name](ref, Path(args.out))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
