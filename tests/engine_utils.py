"""Helpers for engine tests: tiny demo shards, launching real ranks, reading the step log."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


class Ranks:
    """N real processes of ``python -m <module> ...`` wired as a torchrun-style gloo job."""

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
            self.procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=e,
                                               stdout=log, stderr=subprocess.STDOUT))

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
