#!/usr/bin/env bash
# One command for a fresh machine: install, then train IGReg on the generated demo cohort (CPU-sized).
# Writes bundle/demo_data/ (the cohort), bundle/models/model.pt and bundle/eval/ (metrics, logs).
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$(dirname "$0")"
bash setup.sh
cd bundle
../.venv/bin/python -m monai.bundle run training --config_file "['configs/train.yaml','configs/demo.yaml']" "$@"
