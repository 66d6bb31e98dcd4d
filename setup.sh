#!/usr/bin/env bash
# Creates .venv (if absent) and installs the bundle's dependencies and test tools into it.
# PyTorch comes first as the CPU build unless IGREG_TORCH names another requirement
# (e.g. IGREG_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126").
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${IGREG_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, monai; print(f'ready: torch {torch.__version__}, monai {monai.__version__}')"
