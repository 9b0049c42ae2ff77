#!/bin/bash
# Finetune the ImageNet-21K ViL-Base at 384 px on ImageNet-1K:
# `sbatch slurm/finetune_vil_base_in1k_384.sh [overrides...]` from the repository root.
# Defaults: 1 node x 8 GPUs x micro-batch 64 = the recipe's global batch 512 (train.global_batch: other
# layouts derive grad_accum, e.g. --nodes=2 train.micro_batch=32; one that cannot give 512 is refused),
# 24 h, requeued on the time limit/preemption and resumed from
# $RUNS_ROOT/$SLURM_JOB_NAME (= runs/vil_base_in1k_384).
# A node range works too (slurm/common.sh, "Node ranges"): `sbatch --nodes=1-2 slurm/finetune_vil_base_in1k_384.sh
# train.micro_batch=32` starts on 2 nodes when both are free (grad_accum 1), else on 1 (grad_accum 2), and a
# requeued run continues on whichever it gets. The default stays one fixed node.
#
# Site values: export SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS ... before sbatch; paths and the
# Python environment: see slurm/common.sh. This script's inputs:
#   IN1K_TRAIN   [$DATA_ROOT/in1k#train]     data.convert --layout imagefolder --labels in1k --out $DATA_ROOT/in1k
#   IN1K_VAL     [$DATA_ROOT/in1k_val#val]   data.convert --layout imagenet-val --out $DATA_ROOT/in1k_val
#   PRETRAINED   [$RUNS_ROOT/vil_base_in21k]  finetune.init: the pretraining run dir (its newest checkpoint),
#                a checkpoint tag directory, or an official release file
#   FINETUNE_HEAD [map21k, the recipe's]  21K head rows -> the 1K classes; `keep` for a 1K checkpoint
#
#SBATCH --job-name=vil_base_in1k_384
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err

HVP_ENTRY=finetune
HVP_CONFIG=finetune/configs/vil_base_in1k_384.yaml
DATA_ROOT=${DATA_ROOT:-/datasets/shards}
_repo=${HVP_REPO:-${SLURM_SUBMIT_DIR:-.}}
HVP_DEFAULTS=("data.train=${IN1K_TRAIN:-$DATA_ROOT/in1k#train}" "data.eval=${IN1K_VAL:-$DATA_ROOT/in1k_val#val}"
              "finetune.init=${PRETRAINED:-${RUNS_ROOT:-$_repo/runs}/vil_base_in21k}"
              "finetune.head=${FINETUNE_HEAD:-map21k}")
# shellcheck source=slurm/common.sh
source "$_repo/slurm/common.sh" || exit 2
hvp_main "$@"
exit $?
