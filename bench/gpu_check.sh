#!/usr/bin/env bash
# The GPU check (issue 16): ≤ 8 minutes on a machine with a CUDA GPU; writes bench/results/gpu_check.json (or --out).
# Here (after `make setup`, with a CUDA build of torch): bash bench/gpu_check.sh
# On a lent GPU machine (its image's python3, no biaslab install, no default model, no downloads): first, on this
# machine, `.venv/bin/python bench/gpu_prepare.py` (writes .gpu/), then the device call
#   run(command="bash bench/gpu_check.sh --out $OUT/gpu_check.json", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import biaslab" 2>/dev/null; then      # not installed there: run it from the source tree
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
ARGS=()
if ! "$PY" -c "from biaslab.models.embedded import embedded_gguf_path as p; p('smollm2-135m-instruct')" 2>/dev/null; then
  if [ ! -d .gpu/smollm2-shape ]; then
    echo "error: the default model is not installed here and .gpu/smollm2-shape is missing: run bench/gpu_prepare.py" \
         "on a machine with \`make setup\` done and carry .gpu" >&2
    exit 2
  fi
  ARGS+=(--random-from .gpu/smollm2-shape)
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '| transformers', transformers.__version__)"
timeout 480 "$PY" bench/gpu_check.py ${ARGS[@]+"${ARGS[@]}"} "$@"
