#!/usr/bin/env bash
# Validate fastgpt on a machine with a CUDA GPU and no network, within 9 minutes of wall time.
#
#   OUT_DIR=/some/dir bash scripts/gpu_check.sh     # from anywhere, inside the environment to test
#   bash scripts/gpu_check.sh --cpu                 # the plan run on a CPU machine (GPU stages skipped)
#
# The stages (install with the AOT CUDA build + `fastgpt info`, GPU parity tests, headline benchmarks,
# compute-sanitizer memcheck, then `fastgpt bench` as time allows), their time limits and the JSON
# they write are in scripts/gpu_check.py. $OUT_DIR (default benchmarks/results) receives gpu_check.json
# and gpu_check.log after every stage, so a run cut short still leaves what it finished.
# Knobs: GPU_CHECK_BUDGET_S (total seconds, default 540); any flag is passed on (see --help).
set -uo pipefail

cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"  # nvcc, compute-sanitizer
export PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py --out-dir "${OUT_DIR:-benchmarks/results}" "$@"
