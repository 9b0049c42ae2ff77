#!/bin/bash
# Pretrain ViL-Base (RPB, 224) on ImageNet-21K: `sbatch slurm/pretrain_vil_base_in21k.sh [overrides...]`
# from the repository root. Defaults: 8 nodes x 8 GPUs, 48 h, requeued on the time limit/preemption and
# resumed from the run directory $RUNS_ROOT/$SLURM_JOB_NAME (= runs/vil_base_in21k; re-submitting resumes).
#
# Site values: export SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS ... before sbatch; paths and the
# Python environment: see slurm/common.sh (HVP_ENV, RUNS_ROOT, DATA_ROOT, ...). This script's data:
#   IN21K_TRAIN  [$DATA_ROOT/in21k#train]   (data.convert ... --val-per-class N --out $DATA_ROOT/in21k)
#   IN21K_VAL    [$DATA_ROOT/in21k#val]
# Command-line sbatch options override the directives below, e.g. a 2-node CPU test:
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --time=10 \
#       slurm/pretrain_vil_base_in21k.sh "data.train=demo_data#train" "data.eval=demo_data#val" model.name=vil_tiny_rpb_224
# A node range works too (slurm/common.sh, "Node ranges"): Slurm starts (and restarts a requeued job) on as many
# nodes of the range as are free, and the run keeps its global batch on any of them, e.g.
#   sbatch --nodes=4-8 slurm/pretrain_vil_base_in21k.sh train.global_batch=4096
# runs on 8 nodes (grad_accum 1) or 4 (grad_accum 2) and refuses 5-7 (exit 2: 4096 = 64 x 8 x 5..7 x k has no
# integer k). The default stays --nodes=8: the recipe's batch is 8 x 8 x 64, and a range needs G chosen for it.
#
#SBATCH --job-name=vil_base_in21k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err

HVP_ENTRY=pretrain
HVP_CONFIG=pretrain/configs/vil_base_in21k.yaml
DATA_ROOT=${DATA_ROOT:-/datasets/shards}
HVP_DEFAULTS=("data.train=${IN21K_TRAIN:-$DATA_ROOT/in21k#train}" "data.eval=${IN21K_VAL:-$DATA_ROOT/in21k#val}")
# shellcheck source=slurm/common.sh
source "${HVP_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2
hvp_main "$@"
exit $?
