"""Slurm helpers for the sbatch scripts and the submitit launcher: one live job per run directory.

    python -m launch.slurm lock RUN_DIR       # exit 0: this job ($SLURM_JOB_ID) holds RUN_DIR/.slurm-job.lock
                                             # exit 3: another live job holds it (message names it)
    python -m launch.slurm unlock RUN_DIR     # remove the lock if this job holds it
    python -m launch.slurm run-dir DEFAULT [overrides...]   # the run dir: the last ``run.dir=`` wins

The lock names a Slurm job id, not a process: a requeued job (same id) takes its own lock back, and a lock
left by a job that Slurm reports finished (or no longer knows) is stale and taken over. This works across
nodes on any shared file system (no flock needed); the engine additionally flocks ``RUN/.train.lock``.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

LOCK_NAME = ".slurm-job.lock"
EXIT_LOCKED = 3
# Job states after which a job will not run again (anything else, including PENDING after a requeue, is live).
FINISHED_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                   "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}


class RunDirLocked(RuntimeError):
    """Another live job owns the run directory."""


def job_state(job_id: str) -> str | None:
    """Slurm's state of ``job_id``; None when slurmctld does not know it (finished long ago / other cluster)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot ask Slurm about job {job_id}: {e}") from e
    m = re.search(r"\bJobState=(\S+)", r.stdout)
    if m:
        return m.group(1)
    if "Invalid job id" in r.stderr or "Invalid job id" in r.stdout:
        return None
    raise RuntimeError(f"cannot ask Slurm about job {job_id}: {r.stderr.strip() or r.stdout.strip()}")


def job_alive(job_id: str) -> bool:
    state = job_state(job_id)
    return state is not None and state.split("+")[0] not in FINISHED_STATES


def _holder(path: Path) -> str | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    m = re.search(r"\bjob=(\S+)", text)
    return m.group(1) if m else ""


def acquire(run_dir: str | os.PathLike, job_id: str | None = None) -> Path:
    """Take ``RUN_DIR/.slurm-job.lock`` for ``job_id`` (default ``$SLURM_JOB_ID``) or raise RunDirLocked."""
    job_id = str(job_id or os.environ.get("SLURM_JOB_ID", ""))
    if not job_id:
        raise RuntimeError("launch.slurm lock: no job id (not inside a Slurm job and none given)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    text = f"job={job_id} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder == job_id:  # our own lock: a requeued run of this job
                path.write_text(text)
                return path
            if holder and job_alive(holder):
                raise RunDirLocked(f"run directory {run_dir} is in use by live Slurm job {holder} "
                                   f"({path}); use another run.dir=..., or wait for / scancel job {holder}")
            # stale (finished job, or an unreadable lock): move it aside atomically (one taker wins), retry
            stale = path.with_name(f"{LOCK_NAME}.stale.{job_id}")
            try:
                os.rename(path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    raise RunDirLocked(f"could not take {path} (contended)")


def check(run_dir: str | os.PathLike, job_id: str | None = None) -> None:
    """Read-only :func:`acquire` for the other ranks: raise RunDirLocked if another live job holds the lock."""
    job_id = str(job_id or os.environ.get("SLURM_JOB_ID", ""))
    holder = _holder(Path(run_dir) / LOCK_NAME)
    if holder and holder != job_id and job_alive(holder):
        raise RunDirLocked(f"run directory {run_dir} is in use by live Slurm job {holder}; use another "
                           f"run.dir=..., or wait for / scancel job {holder}")


def release(run_dir: str | os.PathLike, job_id: str | None = None) -> bool:
    """Remove the lock if ``job_id`` (default ``$SLURM_JOB_ID``) holds it; True when removed."""
    job_id = str(job_id or os.environ.get("SLURM_JOB_ID", ""))
    path = Path(run_dir) / LOCK_NAME
    if job_id and _holder(path) == job_id:
        path.unlink(missing_ok=True)
        return True
    return False


def run_dir_from_overrides(default: str, overrides) -> str:
    """``run.dir=`` among the overrides wins (the last one), else ``default``."""
    run_dir = default
    for o in overrides:
        if o.startswith("run.dir="):
            run_dir = o.split("=", 1)[1]
    return run_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "lock":
        try:
            path = acquire(argv[1])
        except RunDirLocked as e:
            print(f"launch.slurm: {e}", file=sys.stderr)
            return EXIT_LOCKED
        print(f"launch.slurm: job {os.environ.get('SLURM_JOB_ID')} holds {path}")
        return 0
    if len(argv) >= 2 and argv[0] == "unlock":
        release(argv[1])
        return 0
    if len(argv) >= 2 and argv[0] == "run-dir":
        print(run_dir_from_overrides(argv[1], argv[2:]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
