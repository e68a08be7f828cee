#!/usr/bin/env bash
# The GPU check (issue 16): ~8 minutes on a machine with a CUDA GPU; writes bench/results/gpu_check.json.
# Usage: bash bench/gpu_check.sh   (after `make setup` with a CUDA build of torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
timeout 480 "$PY" bench/gpu_check.py "$@"
