#!/usr/bin/env bash
# Chaos test of exact resume (see scripts/chaos_resume.py): SIGKILL a 2-rank training N times (after random
# steps, inside checkpoint writes, during evaluation), restart it each time, compare with an uninterrupted run.
#   bash scripts/chaos_resume.sh N [--seed S] [--steps STEPS]      exit 0 only when the losses are bit-identical
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" >/dev/null
cd "$ROOT"
exec "$ROOT/.venv/bin/python" scripts/chaos_resume.py "$@"
