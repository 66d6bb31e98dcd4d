"""Parity tests: compare the bundle with golden values of the reference (`fixtures/*.npz`, made by
`make_fixtures.py`); they need neither the reference code nor network access."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
