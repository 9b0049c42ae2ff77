#!/usr/bin/env bash
# What only a GPU shows (DALI mixed decode, bf16/compiled/flex model throughput and MFU, a killed and resumed
# bf16 + compile training run), as a JSON report in $GPU_CHECK_OUT (default runs/gpu_check.json). Without
# CUDA it runs a reduced CPU form and says what it skipped. See scripts/gpu_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" >/dev/null
cd "$ROOT"
exec "$ROOT/.venv/bin/python" scripts/gpu_check.py "$@"
