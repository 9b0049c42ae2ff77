#!/usr/bin/env bash
# README's test command: install what is needed (idempotent), then run the whole test suite.
# The Slurm cluster tests install Debian's slurm packages themselves (tests/slurm_cluster.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Two pytest-xdist workers, one module at a time each (--dist loadfile: a module's fixtures, such as the
# engine tests' reference runs and the Slurm cluster, are built once), modules in tests/conftest.py's
# LONGEST_FIRST order (--no-loadscope-reorder). A serial run leaves about a quarter of 2 cores idle:
# single-process launches, Slurm scheduling and requeue waits. The workers win with AVX2 kernels (CPUs without
# AVX-512, where the suite takes longest) and cost a little with AMX ones: README gives both modes' times.
# HVP_TEST_WORKERS=0 runs serially.
# (Not --dist loadgroup: pytest 9.2 ignores the node ids xdist 3.8 rewrites for it, pytest-xdist#1386.)
WORKERS="${HVP_TEST_WORKERS:-2}"
XDIST=()
[[ "$WORKERS" != 0 ]] && XDIST=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
exec "$ROOT/.venv/bin/python" -m pytest "${XDIST[@]}" "$@"
