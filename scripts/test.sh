#!/usr/bin/env bash
# README's test command: install what is needed (idempotent), then run the whole test suite.
# The Slurm cluster tests install Debian's slurm packages themselves (tests/slurm_cluster.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
