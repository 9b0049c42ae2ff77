# shellcheck shell=bash
# Shared body of the sbatch scripts in slurm/ (sourced by them, never submitted itself).
#
# A script sets HVP_ENTRY (python module: pretrain | finetune), HVP_CONFIG (recipe, relative to the repo)
# and the array HVP_DEFAULTS (site-derived overrides such as data paths), then calls `hvp_main "$@"`.
# The arguments after the script name (`sbatch slurm/X.sh a.b=1 c=2`) are config overrides; they come last
# on the training command line, so they win over HVP_DEFAULTS, and `run.dir=` among them wins over the
# default run directory.
#
# Site settings. #SBATCH lines do not expand variables, so scheduler values go through sbatch's own
# input environment variables, set before `sbatch` (command-line options win over both):
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT, SBATCH_CONSTRAINT, SBATCH_RESERVATION
#   (none set by default: the cluster's default partition/account is used).
# Script variables (environment at submission time; sbatch exports it to the job) [default]:
#   HVP_REPO      checkout to run                              [$SLURM_SUBMIT_DIR: submit from the repo root]
#   HVP_ENV       shell code that activates the Python env,
#                 e.g. "module load cuda/12.4; source ~/envs/hvp/bin/activate"
#                                                              [source $HVP_REPO/.venv/bin/activate if present]
#   PYTHON        interpreter                                  [python]
#   RUNS_ROOT     parent of run directories                    [$HVP_REPO/runs]; run dir = $RUNS_ROOT/$SLURM_JOB_NAME
#   DATA_ROOT     parent of the converted shard sets           [/datasets/shards]
#   HVP_SRUN_ARGS extra srun options (word-split)              [none]
#   HVP_REQUEUE   1: `scontrol requeue` when training exits 85 (checkpointed on SIGUSR1/SIGTERM)   [1]
#
# Signals: `--signal=USR1@T` (in the scripts) delivers USR1 to the srun'd training processes T seconds
# before the time limit; the engine finishes its step, checkpoints and exits 85 ("requeue me"), then this
# script runs `scontrol requeue $SLURM_JOB_ID`; the requeued job (same id, same job name, same run dir)
# resumes from the newest complete checkpoint. SIGTERM (preemption) takes the same path. A signal that
# reaches only the batch shell (`--signal=B:USR1@T`, `scancel --batch`) is forwarded to the training step.
#
# One live job per run directory: RUN_DIR/.slurm-job.lock names the job holding it (see launch/slurm.py);
# a second job on the same run dir exits 3 without touching it. Exit codes: training's own (0 finished,
# 2 bad config, 1 failure), 85 when a requeue was wanted but `scontrol requeue` failed, 3 run dir locked.

EXIT_REQUEUE=85

hvp_log() { printf '[%s %s] %s\n' "$(date -u +%FT%TZ)" "${SLURM_JOB_ID:-nojob}" "$*" >&2; }

hvp_main() {
    set -uo pipefail
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        hvp_log "not inside a Slurm job: submit with sbatch (see the header of $0)"
        return 2
    fi
    local srun_pid="" rc signalled=""
    _hvp_forward() {  # the batch shell got a signal: note it and pass it to the training step (if started)
        signalled=$1
        hvp_log "batch shell got SIG$1${srun_pid:+; forwarding to the training step}"
        [[ -n "${srun_pid:-}" ]] && kill -s "$1" "$srun_pid" 2>/dev/null
    }
    trap '_hvp_forward USR1' USR1
    trap '_hvp_forward TERM' TERM
    HVP_REPO=${HVP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$HVP_REPO" || { hvp_log "HVP_REPO=$HVP_REPO does not exist"; return 2; }
    if [[ ! -f slurm/common.sh ]]; then
        hvp_log "$HVP_REPO is not the repository (submit from its root, or set HVP_REPO)"
        return 2
    fi
    if [[ ! -f "$HVP_ENTRY/__main__.py" ]]; then
        hvp_log "no training entry point $HVP_REPO/$HVP_ENTRY/__main__.py (python -m $HVP_ENTRY)"
        return 2
    fi
    if [[ -n "${HVP_ENV:-}" ]]; then
        eval "$HVP_ENV" || { hvp_log "HVP_ENV failed: $HVP_ENV"; return 2; }
    elif [[ -f "$HVP_REPO/.venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$HVP_REPO/.venv/bin/activate"
    fi
    local python=${PYTHON:-python}
    RUNS_ROOT=${RUNS_ROOT:-$HVP_REPO/runs}

    local run_dir
    run_dir=$("$python" -m launch.slurm run-dir "$RUNS_ROOT/$SLURM_JOB_NAME" "$@") || return 2
    [[ "$run_dir" = /* ]] || run_dir="$HVP_REPO/$run_dir"
    # Validate recipe + overrides once, here, before locking anything (and log the resolved config).
    local cmd=("$python" -u -m "$HVP_ENTRY" --config "$HVP_CONFIG" "${HVP_DEFAULTS[@]}" "run.dir=$run_dir" "$@")
    hvp_log "resolved config:"
    if ! "${cmd[@]}" --print-config; then
        trap '' TERM
        if [[ -n "$signalled" ]] && scontrol requeue "$SLURM_JOB_ID"; then  # killed by the signal, not the config
            hvp_log "signalled before training started; requeued job $SLURM_JOB_ID"
            return 0
        fi
        hvp_log "config rejected (see above); nothing started"
        return 2
    fi
    "$python" -m launch.slurm lock "$run_dir" || return $?

    # CPU threads per task; DeepSpeed's accelerator when the node has no GPU.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi

    local srun_args=(--unbuffered)
    # Slurm 22.05-23.02 srun does not inherit --cpus-per-task from the allocation: pass it on.
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # shellcheck disable=SC2206
    [[ -n "${HVP_SRUN_ARGS:-}" ]] && srun_args+=($HVP_SRUN_ARGS)
    hvp_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
            "${SLURM_NNODES:-?} nodes x ${SLURM_NTASKS_PER_NODE:-?} tasks; run dir $run_dir"
    hvp_log "srun ${srun_args[*]} ${cmd[*]}"

    srun "${srun_args[@]}" "${cmd[@]}" &
    srun_pid=$!
    # `wait` returns early (>128) when a trapped signal arrives: wait again until srun has really exited.
    while true; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR1
    # `scontrol requeue` makes Slurm SIGTERM the whole batch step, scontrol included (it would then report
    # a failure although the requeue went through): from here on SIGTERM is ignored, by scontrol too.
    trap '' TERM
    hvp_log "training step exited with $rc${signalled:+ (batch shell saw SIG$signalled)}"

    # 85: checkpointed, requeue me. A step killed by USR1/TERM (rc 128+10 / 128+15: the signal reached a rank
    # while the engine's handler was not installed, before training or after it) or a signal seen by the
    # batch shell with a failed step also requeues: the job resumes from its newest complete checkpoint.
    if [[ $rc -eq $EXIT_REQUEUE || $rc -eq 138 || $rc -eq 143 || ( -n "$signalled" && $rc -ne 0 ) ]]; then
        if [[ "${HVP_REQUEUE:-1}" == 1 ]] && scontrol requeue "$SLURM_JOB_ID"; then
            hvp_log "requeued job $SLURM_JOB_ID (it resumes from the newest checkpoint in $run_dir)"
            return 0  # the lock stays with this job id: the requeued run takes it back
        fi
        hvp_log "checkpointed but not requeued (HVP_REQUEUE=${HVP_REQUEUE:-1}); resubmit to resume"
    fi
    "$python" -m launch.slurm unlock "$run_dir"
    return "$rc"
}
