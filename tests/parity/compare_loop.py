"""Print the whole-iteration comparison of IGReg with the reference (run by hand, CPU, about 2 minutes):

    OMP_NUM_THREADS=1 python tests/parity/compare_loop.py

Per outer iteration and part of the strategy it prints how many coordinates the bundle steps otherwise
than the reference from the reference's own state, the same for the bundle against itself from that
state scaled by 1 + 1e-7 (the float-rounding floor), and for the three iterations carried by each side.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))                  # tests/: the `parity` package
sys.path.insert(0, str(HERE.parents[1] / "bundle"))

from parity.loop import main  # noqa: E402

if __name__ == "__main__":
    main()
