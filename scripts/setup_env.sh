#!/usr/bin/env bash
# Create/refresh the project's virtual environment at .venv/ (idempotent: a second run with unchanged
# inputs installs nothing). Used by scripts/demo.sh and scripts/test.sh; safe to run by hand.
#
#   HVP_EXTRAS   pip extras to install (default: dali,test; on clusters with CUDA 12 use dali-cuda120,test)
#   PYTHON       interpreter used to create the venv (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRAS="${HVP_EXTRAS:-dali,test}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.hvp-install-stamp"

stamp() {
  cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/scripts/setup_env.sh" \
      "$ROOT/launch/torchvision_compat.py" | sha256sum | cut -d' ' -f1
  echo "$EXTRAS"
}

# Byte-compile the project's own packages: pip compiles what it installs, but not an editable install's
# sources, and where PYTHONDONTWRITEBYTECODE is set (as on some CI images) every fresh process (each rank,
# each CLI call) would compile them again: 0.4-0.6 CPU-s per process on a 2-core EPYC. Cheap when up to date;
# a stale file is simply recompiled in memory by Python.
compile_project() {
  "$VENV/bin/python" -m compileall -q "$ROOT/models" "$ROOT/data" "$ROOT/pretrain" "$ROOT/finetune" \
      "$ROOT/launch" || echo "[setup] could not byte-compile every project module (errors above)" >&2
}

if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(stamp)" ]] && [[ -x "$VENV/bin/python" ]]; then
  compile_project
  echo "[setup] .venv is up to date (nothing to install)"
  exit 0
fi

echo "[setup] installing into $VENV (extras: $EXTRAS)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# constraints.txt pins torch/torchvision for every requirement (no CUDA torch pulled onto a CPU box).
PIP_CONSTRAINT="$ROOT/constraints.txt" "$VENV/bin/pip" install --quiet -e "$ROOT[$EXTRAS]"

# CPU-torch + CUDA-torchvision fix and DS_ACCELERATOR default: a startup hook in the venv
# (see launch/torchvision_compat.py; it does nothing where torchvision's extension loads).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/launch/torchvision_compat.py" "$SITE/_hvp_compat.py"
echo "import _hvp_compat" > "$SITE/_hvp_compat.pth"

"$VENV/bin/python" -c "import timm, deepspeed, webdataset, submitit, torch.utils.tensorboard" \
  || { echo "[setup] the installed environment cannot import its stack" >&2; exit 1; }
compile_project
stamp > "$STAMP"
echo "[setup] done"
