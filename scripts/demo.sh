#!/usr/bin/env bash
# README's main command: the embedded default, end to end on a CPU machine (2 processes, gloo).
#   1. generate class-structured demo images and convert them to WebDataset shards (demo_data/)
#   2. pretrain ViL-Tiny-RPB at 96 px, DeepSpeed ZeRO-2, precision auto, evaluate -> runs/demo/
#   3. finetune it at 128 px (windows/bias tables resized by the checkpoint filter) -> runs/demo_finetune/
#   4. export the finetuned weights: timm, the ViL release layout, its detectron2 layout -> runs/demo_finetune/exports/
# Re-running resumes/skips finished parts (the run directories hold their checkpoints).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NPROC="${NPROC:-2}"
start=$(date +%s)

echo "== 1/4 demo data"
[[ -f demo_data/manifest.json ]] || "$PY" -m data.demo --out demo_data --classes 10 --per-class 300 --size 160

echo "== 2/4 pretrain (ViL-Tiny-RPB @96, ${NPROC} processes, ZeRO-2, precision auto: bf16 where native, else fp32)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m pretrain \
    --config pretrain/configs/demo.yaml "$@"

echo "== 3/4 finetune at 128 px"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m finetune \
    --config finetune/configs/demo_finetune.yaml

echo "== 4/4 export"
"$PY" -m finetune.export --ckpt runs/demo_finetune --format timm release release-d2

"$PY" - <<'PY'
import json
for run in ("runs/demo", "runs/demo_finetune"):
    lines = [json.loads(l) for l in open(f"{run}/train_log.jsonl")]
    ev = [json.loads(l) for l in open(f"{run}/eval_log.jsonl")]
    first = sum(r["loss"] for r in lines[:10]) / min(10, len(lines))
    last = sum(r["loss"] for r in lines[-10:]) / min(10, len(lines))
    print(f"{run}: loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10), eval top-1 {ev[-1]['eval/top1']:.1f}%")
PY
echo "demo finished in $(( $(date +%s) - start )) s; TensorBoard: .venv/bin/tensorboard --logdir runs"
