#!/usr/bin/env bash
# The GPU benchmark: harvest vs a plain forward, patching vs TransformerLens, the probe sweep and
# SAE training tokens/s, on SmolLM2 at float32 and bfloat16, on one NVIDIA GPU (about 5 minutes).
# Writes bench/RESULTS.md (naming the GPU) and bench/RESULTS.json. Needs nothing beyond
# `make setup` (the default model is converted on first use).
#
#   bash bench/gpu.sh                 # on a machine with one CUDA GPU
#   bash bench/gpu.sh --dry-run       # CPU smoke run with the tiny model (what the tests run)
#   bash bench/gpu.sh --dry-run --out /tmp/RESULTS.md --work /tmp/gpu-bench
#
# Exit codes: 0 all sections ran; 1 a section failed (recorded in RESULTS.md); 2 no usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" != "--dry-run" ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/bench_gpu.py "$@"
