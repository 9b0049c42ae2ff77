"""Submit a training recipe through submitit: ``python -m launch.submit``.

    python -m launch.submit --config pretrain/configs/vil_base_in21k.yaml --nodes 8 --gpus-per-node 8 \\
        --tasks-per-node 8 [--partition P] [--account A] [--time MIN] [--local] [section.key=value ...]

The job runs the same training function as ``python -m pretrain`` (``<entry>.__main__.main(argv)``, i.e.
``pretrain.trainer.train(cfg)``) in each of the ``nodes x tasks-per-node`` tasks; ``launch.distributed``
reads ranks and the master address from submitit's ``JobEnvironment``. Logs go to ``RUN/submitit/``
(``%j_<task>_log.out/err``); the submitit folder lives inside the run directory so a run is one folder.
Prints the job id, the log path and the run directory (``--wait``: also waits and prints the results).

Preemption and time limit: submitit's Slurm jobs get ``--signal=USR2@<signal-delay-s>`` (its
``SUBMITIT_PREEMPT_SIGNAL``, default USR2) and, on preemption, SIGTERM. :class:`TrainJob` routes the USR
signal to the engine's ``request_stop`` (the engine takes SIGUSR1/SIGTERM itself), so training finishes
the step, all ranks write the DeepSpeed checkpoint and return 85; then rank 0 hands over to submitit's own
handler, which calls :meth:`TrainJob.checkpoint` (a fresh ``TrainJob``: resume is automatic from the run
dir), requeues the job (``scontrol requeue``) and exits. Submitit counts the requeue as a timeout when the
job ran past ``min(0.8 x time, time - 10 min)`` (at most ``--max-timeouts`` of those), else as a preemption.

Site values: ``SBATCH_PARTITION`` / ``SBATCH_ACCOUNT`` / ``SBATCH_QOS`` ... are read by sbatch itself, so
they apply here too; ``--partition``/``--account`` win.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import io
import os
import signal
import sys
import time
from pathlib import Path

import yaml

EXIT_REQUEUE = 85  # launch.signals.EXIT_REQUEUE (not imported here: the client must not import torch)
REPO = Path(__file__).resolve().parents[1]


def entry_for(config: str) -> str:
    """``finetune/configs/x.yaml`` -> ``finetune``; anything else -> ``pretrain``."""
    parts = Path(config).parts
    return "finetune" if "finetune" in parts else "pretrain"


def resolve_config(entry: str, config: str, overrides: list[str]) -> dict:
    """Validate recipe + overrides exactly as the entry point will (its ``--print-config``); the dict."""
    main = importlib.import_module(f"{entry}.__main__").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["--config", config, *overrides, "--print-config"])
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 2
    if rc != 0:
        raise ValueError((err.getvalue() or out.getvalue()).strip() or f"{entry}: config rejected ({rc})")
    return yaml.safe_load(out.getvalue()) or {}


def _exit_once_success_is_recorded(result_pickle: Path) -> None:
    """At interpreter exit of a task whose training succeeded: once submitit has written this task's
    success result, end with 0 without interpreter teardown (why: :func:`launch.distributed.exit_process`).
    Any other outcome (the result could not be pickled, ...) exits the normal way."""
    from submitit.core.utils import pickle_load

    try:
        outcome = pickle_load(result_pickle)[0]
    except Exception:  # noqa: BLE001  (no readable result: let submitit's own exit status stand)
        return
    if outcome == "success":
        from launch.distributed import exit_process

        exit_process(0)


class TrainJob:
    """The submitit callable: one training task; ``checkpoint()`` makes submitit requeue it on a signal."""

    def __init__(self, entry: str, argv: list[str], run_dir: str, lock: bool = True):
        self.entry, self.argv, self.run_dir, self.lock = entry, list(argv), run_dir, lock

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        rank = env.global_rank
        slurm_job = os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and os.environ.get("SLURM_JOB_ID")
        if self.lock and slurm_job:
            from launch.slurm import acquire, check

            # RunDirLocked -> the job fails, run dir untouched. Every rank checks, so none of them is left
            # waiting for a rank 0 that gave up.
            (acquire if rank == 0 else check)(self.run_dir, os.environ["SLURM_JOB_ID"])
        usr = env._usr_sig()
        submitit_handler = signal.getsignal(usr)
        from launch.signals import request_stop

        # The engine replaces SIGUSR1/SIGTERM handlers itself (and chains them after its checkpoint);
        # submitit's USR signal would requeue mid-step, so it only asks for a stop at the next step here.
        signal.signal(usr, lambda signum, _frame: request_stop(signum))
        try:
            rc = importlib.import_module(f"{self.entry}.__main__").main(self.argv)
        finally:
            signal.signal(usr, submitit_handler)
        if rc == EXIT_REQUEUE:
            # Checkpoint written by every rank. submitit's handler: rank 0 calls self.checkpoint(), runs
            # `scontrol requeue` and exits (SystemExit); other ranks return from it at once.
            if callable(submitit_handler):
                # `scontrol requeue` makes Slurm SIGTERM every process of the step, the scontrol child
                # included, which then "fails" although the requeue went through. An ignored signal is
                # inherited across exec: ignore SIGTERM (submitit only logs it anyway) so scontrol finishes.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                submitit_handler(usr, None)
            if rank != 0 and callable(submitit_handler):
                # Do not return: a result file here would be read as this task's final result while the
                # job is requeued. Wait for the requeue to stop us (or give up after 5 minutes).
                deadline = time.time() + 300
                while time.time() < deadline:
                    time.sleep(1)
            raise RuntimeError(f"training checkpointed and asked for a requeue (exit {rc}) but the job was not "
                               f"requeued; resubmit to resume from {self.run_dir}")
        if slurm_job and rank == 0 and self.lock:
            from launch.slurm import release

            release(self.run_dir, os.environ["SLURM_JOB_ID"])
        if rc != 0:
            raise RuntimeError(f"python -m {self.entry} {' '.join(self.argv)} exited with {rc} (see the log above)")
        atexit.register(_exit_once_success_is_recorded, env.paths.result_pickle)
        return {"rank": rank, "exit_code": rc, "run_dir": self.run_dir}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/timeout, after the engine saved: resubmit the same task."""
        import submitit

        return submitit.helpers.DelayedSubmission(self.__class__(self.entry, self.argv, self.run_dir, self.lock))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (pretrain/configs/... or finetune/configs/...)")
    p.add_argument("--entry", choices=["pretrain", "finetune"], default=None,
                   help="training module (default: from the recipe's folder)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 on CPU clusters)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: gpus-per-node, or 1 without GPUs")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None, help="default: $SBATCH_PARTITION / the cluster default")
    p.add_argument("--account", default=None, help="default: $SBATCH_ACCOUNT")
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    p.add_argument("--job-name", default=None, help="default: the recipe's file name")
    p.add_argument("--signal-delay-s", type=int, default=180,
                   help="seconds before the time limit at which the checkpoint signal is sent (default 180)")
    p.add_argument("--max-timeouts", type=int, default=3, help="requeues on timeout before giving up (default 3)")
    p.add_argument("--local", action="store_true", help="run with submitit's local executor (no Slurm)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its results")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_intermixed_args(argv)


def submit(args) -> tuple:
    """Submit as described by parsed ``args``; returns (job, run_dir)."""
    import submitit

    entry = args.entry or entry_for(args.config)
    cfg = resolve_config(entry, args.config, list(args.overrides))
    run_dir = Path((cfg.get("run") or {}).get("dir") or "runs/default")
    run_dir = run_dir if run_dir.is_absolute() else Path.cwd() / run_dir
    run_dir = run_dir.resolve()
    argv = ["--config", str(Path(args.config).resolve()), *args.overrides, f"run.dir={run_dir}"]
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    folder = run_dir / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else None,
                               slurm_max_num_timeout=args.max_timeouts)
    params = dict(name=args.job_name or Path(args.config).stem, nodes=args.nodes, tasks_per_node=tasks,
                  timeout_min=args.time)
    if args.gpus_per_node or not args.local:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if ex.cluster == "slurm":
        params.update(slurm_signal_delay_s=args.signal_delay_s,
                      slurm_additional_parameters={"requeue": True},
                      slurm_setup=[f"cd {REPO}", f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}",
                                   "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"])
        if args.cpus_per_task:  # srun 22.05-23.02 does not inherit --cpus-per-task from the allocation
            params["slurm_srun_args"] = [f"--cpus-per-task={args.cpus_per_task}"]
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
    elif args.local and args.nodes > 1:
        raise ValueError("--local runs on this machine: use --nodes 1")
    ex.update_parameters(**params)
    from launch.submit import TrainJob as job_cls  # by reference, also under `python -m launch.submit`

    job = ex.submit(job_cls(entry, argv, str(run_dir), lock=not args.local))
    return job, run_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        job, run_dir = submit(args)
    except ValueError as e:
        print(f"launch.submit: {e}", file=sys.stderr)
        return 2
    print(f"job id: {job.job_id}")
    print(f"log: {job.paths.stdout}")
    print(f"run dir: {run_dir}", flush=True)
    if not args.wait:
        return 0
    try:
        results = job.results()
    except Exception as e:  # the job's exception (its traceback is in the log)
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
