#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) under a time limit: one CUDA device, no network, the machine's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
timeout 480 "$PY" benchmarks/gpu_check.py "$@"
