#!/bin/bash
# Any recipe: `sbatch -J RUN_NAME [sbatch options] slurm/train.sh RECIPE.yaml [overrides...]`
# from the repository root. The entry module follows the recipe's folder (pretrain/configs/* -> pretrain,
# finetune/configs/* -> finetune; HVP_ENTRY overrides). Run dir: $RUNS_ROOT/RUN_NAME unless run.dir=...
# Site values and paths: see slurm/common.sh. The directives are a modest default (1 node x 8 GPUs);
# override them on the command line, e.g. `sbatch -J demo --nodes=2 --ntasks-per-node=1 --gpus-per-node=0
# slurm/train.sh pretrain/configs/demo.yaml data.train=...`. A node range (`--nodes=6-8`) works with every
# recipe; set train.global_batch with it (slurm/common.sh, "Node ranges").
#
#SBATCH --job-name=train
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

if [[ $# -lt 1 || "$1" != *.yaml && "$1" != *.yml ]]; then
    echo "usage: sbatch -J NAME slurm/train.sh RECIPE.yaml [section.key=value ...]" >&2
    exit 2
fi
HVP_CONFIG=$1
shift
case "$HVP_CONFIG" in
    finetune/*|*/finetune/*) HVP_ENTRY=${HVP_ENTRY:-finetune} ;;
    *) HVP_ENTRY=${HVP_ENTRY:-pretrain} ;;
esac
HVP_DEFAULTS=()
# shellcheck source=slurm/common.sh
source "${HVP_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2
hvp_main "$@"
exit $?
