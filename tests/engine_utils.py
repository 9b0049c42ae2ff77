"""Helpers for engine tests: tiny demo shards, launching real ranks, reading the step log."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny but real run: ViL-Tiny-RPB at 64 px on 8-class demo shards, 2 ranks (gloo, CPU).
TINY = ["model.name=vil_tiny_rpb_224", "model.img_size=64", "model.drop_path=0.1",
        "data.pipeline=torch", "data.workers=0", "train.micro_batch=8", "log.every_steps=1",
        "checkpoint.every_minutes=0", "aug.randaug=rand-m5-mstd0.5", "aug.mixup=0.2", "aug.cutmix=0.2",
        "sched.warmup_steps=2", "optim.lr=1e-3", "eval.every_epoch=false", "run.provenance=false"]


def make_demo_shards(out: Path, classes=8, per_class=24, size=64) -> Path:
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data.demo", "--out", str(out), "--classes", str(classes),
                        "--per-class", str(per_class), "--size", str(size), "--seed", "0"],
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SUBMITIT", "HVP_FAULT"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra or {})
    return env


# Read at run time, never at import (or not at all: pytest's per-test marker): they may differ between a
# rank and the zygote it is forked from.
RUNTIME_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "HVP_FAULT_NAN_STEPS", "HVP_FAULT_CRASH_IN_CKPT", "HVP_DATA_CACHE", "PYTEST_CURRENT_TEST",
               "HVP_TEST_FRESH_RANKS"}


def _import_env(env: dict) -> dict:
    """The part of an environment that an interpreter may read while it imports."""
    return {k: v for k, v in env.items() if k not in RUNTIME_ENV}


def forkable(env: dict, zygote_env: dict, set_by_imports: dict) -> bool:
    """Whether a rank started with ``env`` would import exactly what a zygote started with ``zygote_env``
    did: the same values outside RUNTIME_ENV, except where ``env`` already holds the value that importing
    the stack sets (``DS_ACCELERATOR=cpu``: the test process has imported the stack and passes it on)."""
    a, b = _import_env(env), _import_env(zygote_env)
    return all(a.get(k) == b.get(k) or (k in set_by_imports and a.get(k) == set_by_imports[k])
               for k in a.keys() | b.keys())


class ForkedRank:
    """The :class:`subprocess.Popen` surface the tests use, for a rank that a zygote forked."""

    def __init__(self, zygote: "Zygote", pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self):
        with self.zygote.cond:
            self.returncode = self.zygote.codes.get(self.pid)
        return self.returncode

    def wait(self, timeout=None):
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.pid in self.zygote.codes or self.zygote.dead,
                                             timeout):
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
            if self.pid not in self.zygote.codes:
                raise RuntimeError(f"the zygote that forked rank pid {self.pid} died")
            self.returncode = self.zygote.codes[self.pid]
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """A ``tests/rank_zygote.py`` server: one interpreter with the stack imported that forks ranks."""

    def __init__(self, env: dict):
        self.env = env
        self.cond = threading.Condition()
        self.codes: dict[int, int] = {}
        self.pids: list[int] = []
        self.ready = self.dead = False
        self.import_env: dict = {}  # what the zygote's imports added to its environment
        self.lock = threading.Lock()
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "rank_zygote.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "exit" in msg:
                    self.codes[msg["exit"]] = msg["code"]
                elif "pid" in msg:
                    self.pids.append(msg["pid"])
                else:
                    self.ready, self.import_env = True, msg["import_env"]
                self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def wait_ready(self, timeout=300) -> bool:
        """Whether the zygote has finished its imports (False if it died or is still importing)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.ready or self.dead, timeout) and not self.dead

    def spawn(self, module: str, args: list[str], env: dict, log_path: Path) -> ForkedRank:
        with self.lock, self.cond:
            if not self.wait_ready():
                self.stderr.seek(0)
                raise RuntimeError("rank zygote did not start:\n" + self.stderr.read().decode()[-4000:])
            n = len(self.pids)
            req = {"module": module, "args": args, "env": env, "cwd": str(ROOT), "log": str(log_path)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            self.cond.wait_for(lambda: len(self.pids) > n or self.dead, 60)
            if len(self.pids) <= n:
                raise RuntimeError("rank zygote did not fork")
            return ForkedRank(self, self.pids[n])


ZYGOTE_RANKS = 2
_ZYGOTES: dict[int, Zygote] = {}


def launch_rank(module: str, args: list[str], env: dict, rank: int, log) -> subprocess.Popen | ForkedRank:
    """Start one rank: forked from the zygote for its rank index when the environment allows, else fresh.

    One zygote per rank index, so that the ranks of a job come from different interpreters (different hash
    seeds, as separately started processes have). Only ranks 0 and 1 have one: a zygote costs a rank's
    imports, and the few runs with more ranks would not win them back. ``HVP_TEST_FRESH_RANKS=1`` starts
    every rank fresh.
    """
    base = clean_env()
    if os.environ.get("HVP_TEST_FRESH_RANKS") == "1" or rank >= ZYGOTE_RANKS or not forkable(env, base, {}):
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    z = _ZYGOTES.get(rank)
    if z is not None:
        z.wait_ready()  # its import_env is known once it is ready
    if z is None or z.dead or not forkable(base, z.env, z.import_env):
        if z is not None:
            z.proc.stdin.close()  # it exits at end of input; ranks it forked run on
        z = _ZYGOTES[rank] = Zygote(base)
    return z.spawn(module, args, env, Path(log.name))


def script_ranks_forked(monkeypatch) -> None:
    """Run a script of ``scripts/`` in this process as its subprocess test would, but with its ranks from
    launch_rank: scripts/chaos_resume.py's ``start_ranks`` (scripts/gpu_check.py uses it too) starts each
    rank through ``RANK_LAUNCHER``, and ``os.environ`` becomes clean_env() (what the script's process had)
    for the test. The ranks are the same processes; the ``slow`` tests still run the scripts as subprocesses."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import chaos_resume
    monkeypatch.setattr(chaos_resume, "RANK_LAUNCHER", launch_rank)
    env = clean_env()
    for k in list(os.environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)


class Ranks:
    """N real processes of ``python -m <module> ...`` wired as a torchrun-style gloo job.

    Each rank is its own process. By default it is forked from a pre-imported interpreter
    (``tests/rank_zygote.py``), which saves the stack's import time per rank (see there).
    """

    def __init__(self, args: list[str], nproc: int = 2, module: str = "pretrain", env: dict | None = None,
                 log_dir: Path | None = None, rank_env: dict[int, dict] | None = None):
        port = str(free_port())
        self.logs = []
        self.procs = []
        for r in range(nproc):
            e = clean_env(env)
            e.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(rank_env or {}).get(r, {}))
            log = open((log_dir or Path("/tmp")) / f"rank{r}-{port}.log", "w+")
            self.logs.append(log)
            self.procs.append(launch_rank(module, list(args), e, r, log))

    def wait(self, timeout=600) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("training did not finish in time:\n" + self.output())
        return codes

    def signal(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def output(self, rank: int = 0, tail: int | None = 6000) -> str:
        """The rank's log: its last ``tail`` characters (enough for a failure message), or all of it."""
        f = self.logs[rank]
        f.flush()
        f.seek(0)
        text = f.read()
        return text[-tail:] if tail else text


def run_ranks(args, nproc=2, env=None, timeout=600, expect=0, log_dir=None) -> Ranks:
    r = Ranks(args, nproc=nproc, env=env, log_dir=log_dir)
    codes = r.wait(timeout)
    if expect is not None:
        assert codes == [expect] * nproc, f"exit codes {codes}\n" + r.output(0) + "\n---rank1---\n" + \
            (r.output(1) if nproc > 1 else "")
    return r


def step_losses(run_dir: Path) -> dict[int, float]:
    """Optimizer step -> loss from train_log.jsonl; a resumed run's later entry for a step wins."""
    out = {}
    path = run_dir / "train_log.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def wait_for_steps(run_dir: Path, n: int, ranks: Ranks, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(step_losses(run_dir)) >= n:
            return
        if any(p.poll() is not None for p in ranks.procs):
            raise AssertionError("training exited early:\n" + ranks.output())
        time.sleep(0.2)
    ranks.kill()
    raise AssertionError(f"no step {n} within {timeout}s:\n" + ranks.output())
