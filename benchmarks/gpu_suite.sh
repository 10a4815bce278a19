#!/usr/bin/env bash
# GPU suite for a lent accelerator (one H100/H200-class GPU): under 8 minutes, no weights needed.
#
#   bash benchmarks/gpu_suite.sh                 # the full suite, one table at the end
#   bash benchmarks/gpu_suite.sh --rows "vision padded,generate b8"
#   bash benchmarks/gpu_suite.sh --tiny          # the same code on CPU at tiny shapes (smoke test)
#
# Models are built at full size (Llama-3-8B + BiomedCLIP ViT-B/16, and the LoRA variant) on the meta
# device and initialised at random on the GPU: see benchmarks/bench_gpu.py for the rows and the FLOPs
# rule behind MFU. Output: the log and table in $OUT (default /tmp/medtune_gpu_suite/gpu_suite_<time>.txt) and
# the rows as JSON next to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
OUT="${OUT:-${TMPDIR:-/tmp}/medtune_gpu_suite}"
mkdir -p "$OUT"
stamp="$(date +%Y%m%d_%H%M%S)"
log="$OUT/gpu_suite_$stamp.txt"
budget="${GPU_SUITE_BUDGET:-420}"  # seconds: rows start only within it; the whole suite fits in 8 minutes

if [[ " $* " != *" --tiny "* ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: error: no CUDA device visible to torch (use --tiny for the CPU smoke run)" >&2
    exit 2
  fi
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
  fi
fi
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM=false
set +e
timeout --signal=INT --kill-after=20 "$((budget + 30))" "$PY" benchmarks/bench_gpu.py --budget-s "$budget" --json "$OUT/gpu_suite_$stamp.json" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "gpu_suite: log $log (exit $status)"
exit "$status"
