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
# Node ranges: `sbatch --nodes=6-8 slurm/X.sh ...` (any script) lets Slurm start the job on as many nodes of
# the range as it can without waiting, and restart a requeued job on whatever part of the range is free then.
# Nothing here assumes the #SBATCH node count: srun starts the tasks of the allocation the job got
# (SLURM_NTASKS = SLURM_JOB_NUM_NODES x SLURM_NTASKS_PER_NODE, set by Slurm), and each rank reads its rank,
# the world size and the master node from its srun step (launch/distributed.py). The run resumes its newest
# checkpoint on the new world with the same global batch G (pretrain/elastic.py: grad_accum =
# G / (micro_batch x world), logged as "resumed step N from world A onto world B, grad_accum x -> y").
# Set train.global_batch with a range (e.g. 4096 for the ViL-B 21K recipe: 8 nodes x 8 GPUs x 64), or the
# first allocation's size fixes G.
# A size that cannot give G is refused before anything is written: exit 2, the job fails and is not
# requeued. So choose a range whose sizes all give G (micro 64 x 8 GPUs, G 4096: --nodes=4-8 runs on 4 or 8
# nodes and fails on 5-7; Slurm >= 23.02 also takes a list, --nodes=4,8, untested here: the test cluster
# runs 22.05). Two Slurm rules, measured on 22.05: a range job gets at most min x tasks-per-node nodes
# (Slurm sets its task count to that), so with 1 task per node a range never grows past its minimum; and a
# requeued job keeps the task count of its last allocation, so it would wait for that many nodes again:
# hvp_requeue lowers it after requeueing (tests/test_slurm_elastic.py: 2 nodes, requeue, 1 node).
# The scripts' defaults stay fixed node counts: a range only works with a G chosen for all its sizes.
#
# One live job per run directory: RUN_DIR/.slurm-job.lock names the job holding it (see launch/slurm.py);
# a second job on the same run dir exits 3 without touching it. Exit codes: training's own (0 finished,
# 2 bad config, 1 failure), 85 when a requeue was wanted but `scontrol requeue` failed, 3 run dir locked.

EXIT_REQUEUE=85

hvp_log() { printf '[%s %s] %s\n' "$(date -u +%FT%TZ)" "${SLURM_JOB_ID:-nojob}" "$*" >&2; }

# `scontrol requeue` this job, then undo the task count Slurm pinned to this allocation (nodes x tasks per
# node), which would make the requeued job wait for as many nodes as it has now. max(nodes, tasks per node)
# lies within what every size of the submitted range allows: >= the minimum node count (this allocation is
# at least that), and <= minimum x tasks per node (Slurm's cap on the allocation, so this one is below it).
# For a fixed node count it changes nothing Slurm uses: the allocation again gets nodes x tasks per node
# (both measured on 22.05). A requeue Slurm does by itself (node failure) does not come through here.
hvp_requeue() {
    scontrol requeue "$SLURM_JOB_ID" || return 1
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} tpn=${SLURM_NTASKS_PER_NODE:-}
    [[ "$tpn" =~ ^[0-9]+$ && "$nodes" =~ ^[0-9]+$ && $nodes -gt 1 ]] || return 0
    local tasks=$(( nodes > tpn ? nodes : tpn ))
    if scontrol update JobId="$SLURM_JOB_ID" NumTasks="$tasks"; then
        hvp_log "requeued job's task count set to $tasks: it may restart on fewer than $nodes nodes (--nodes=min-max)"
    else
        hvp_log "could not lower the requeued job's task count: it restarts only on $nodes nodes or more"
    fi
    return 0
}

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
        if [[ -n "$signalled" ]] && hvp_requeue; then  # killed by the signal, not the config
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
            "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-?}} nodes x ${SLURM_NTASKS_PER_NODE:-?} tasks" \
            "(world ${SLURM_NTASKS:-?}); run dir $run_dir"
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
        if [[ "${HVP_REQUEUE:-1}" == 1 ]] && hvp_requeue; then
            hvp_log "requeued job $SLURM_JOB_ID (it resumes from the newest checkpoint in $run_dir)"
            return 0  # the lock stays with this job id: the requeued run takes it back
        fi
        hvp_log "checkpointed but not requeued (HVP_REQUEUE=${HVP_REQUEUE:-1}); resubmit to resume"
    fi
    "$python" -m launch.slurm unlock "$run_dir"
    return "$rc"
}
