#!/usr/bin/env bash
# Creates .venv (if absent) and installs the bundle's dependencies and test tools into it.
# PyTorch comes first: torch==2.13.0 from the configured package index unless IGREG_TORCH names
# another requirement. On Linux, the public PyPI's torch wheel is the CUDA build (it pulls the NVIDIA
# runtime wheels, several GB, and also runs on the CPU); on macOS and Windows it is the CPU build.
# CPU-only build:  IGREG_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# a CUDA version:  IGREG_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cuXYZ"
#                  (cuXYZ: one of the CUDA versions pytorch.org lists for that release, e.g. cu126)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${IGREG_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, monai; print(f'ready: torch {torch.__version__}, monai {monai.__version__}')"
