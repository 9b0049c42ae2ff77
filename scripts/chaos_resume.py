"""Chaos test of exact resume: SIGKILL a 2-rank training at N random moments, restart it each time, and
compare the final per-step losses with an uninterrupted run (they must be bit-identical).

    python scripts/chaos_resume.py N [--seed S] [--steps STEPS] [--workdir DIR]

The kill moments are drawn from three kinds, so that each kind is hit over a run:
  step   after a random step (the ranks may be anywhere in the next one);
  ckpt   while a checkpoint is being written (a tag folder exists, its COMPLETE marker does not yet);
  eval   while the evaluation after an ``eval.every_steps`` step runs (before its result is logged).
Prints one line per kill and the result; exit 0 only when the losses are identical.
Training: ViL-Tiny-RPB at 64 px on generated demo shards, ZeRO-1, fp32, 2 processes (gloo, CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["model.name=vil_tiny_rpb_224", "model.img_size=64", "model.drop_path=0.1", "data.pipeline=torch",
         "data.workers=0", "train.micro_batch=8", "log.every_steps=1", "checkpoint.every_minutes=0",
         "aug.randaug=rand-m5-mstd0.5", "aug.mixup=0.2", "aug.cutmix=0.2", "sched.warmup_steps=2",
         "optim.lr=1e-3", "eval.every_epoch=false", "run.provenance=false", "precision=fp32",
         "deepspeed.zero_stage=1", "checkpoint.every_steps=2", "checkpoint.keep=2", "eval.every_steps=4",
         "log.image_grid=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popen_rank(module: str, args: list[str], env: dict, rank: int, log) -> subprocess.Popen:
    """Start one rank as a fresh interpreter: ``python -m MODULE ARGS``, output to the open file ``log``."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


# How start_ranks starts each rank process (same signature as popen_rank). The test suite swaps in its
# launcher that forks each rank, still its own process, from an interpreter that has imported the stack.
RANK_LAUNCHER = popen_rank


def start_ranks(overrides: list[str], log: Path, nproc: int = 2) -> list[subprocess.Popen]:
    """``nproc`` processes of ``python -m pretrain --config pretrain/configs/demo.yaml OVERRIDES`` wired as one
    job (torchrun's variables); output appended to ``LOG.rank{r}.log``."""
    port = str(_free_port())
    procs = []
    for r in range(nproc):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "HVP_FAULT"))}
        env.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONWARNINGS="ignore")
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(log.with_suffix(f".rank{r}.log"), "a") as out:  # the child keeps its own descriptor
            procs.append(RANK_LAUNCHER("pretrain", ["--config", "pretrain/configs/demo.yaml", *overrides], env, r,
                                       out))
    return procs


def start(run_dir: Path, data: Path, steps: int, log: Path) -> list[subprocess.Popen]:
    return start_ranks([f"run.dir={run_dir}", f"data.train={data}#train", f"data.eval={data}#val",
                        f"train.max_steps={steps}", *TRAIN], log)


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    path = run_dir / "train_log.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            out[rec["step"]] = rec["loss"]
    return out


def _evals(run_dir: Path) -> set[int]:
    path = run_dir / "eval_log.jsonl"
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()} \
        if path.exists() else set()


def _writing_checkpoint(run_dir: Path) -> bool:
    ck = run_dir / "checkpoints"
    return ck.is_dir() and any(p.is_dir() and p.name.startswith("step_") and not (p / "COMPLETE").exists()
                               for p in ck.iterdir())


def _condition(kind: str, run_dir: Path, target: int, every_eval: int):
    """A predicate that turns true at the moment to kill."""
    if kind == "step":
        return lambda: max(step_losses(run_dir), default=0) >= target
    if kind == "ckpt":
        return lambda: max(step_losses(run_dir), default=0) >= target and _writing_checkpoint(run_dir)
    return lambda: (max(step_losses(run_dir), default=0) >= target and
                    max(step_losses(run_dir), default=0) % every_eval == 0 and
                    max(step_losses(run_dir), default=0) not in _evals(run_dir))


def run_until(procs, cond, timeout: float) -> bool:
    """Poll until ``cond`` (True: killed) or the ranks exit (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
            return True
        if all(p.poll() is not None for p in procs):
            return False
        time.sleep(0.005)
    for p in procs:
        p.kill()
    raise TimeoutError("the training made no progress within the timeout")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kills", type=int)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: max(16, 2 N + 4))")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    args.steps = args.steps or max(16, 2 * args.kills + 4)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hvp_chaos_"))
    data = work / "data"
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data.demo", "--out", str(data), "--classes", "8", "--per-class", "24",
                        "--size", "64", "--seed", "0", "--quiet"], cwd=ROOT, check=True)
    print(f"chaos: {args.kills} kills, seed {seed}, {args.steps} steps, work dir {work}", flush=True)

    ref_dir = work / "reference"
    ref = start(ref_dir, data, args.steps, work / "reference")
    if any(p.wait(timeout=args.timeout) != 0 for p in ref):
        print(f"reference run failed: see {work}/reference.rank0.log")
        return 1
    reference = step_losses(ref_dir)

    run_dir, kinds = work / "chaos", ("step", "ckpt", "eval")
    restarts = 0
    for i in range(args.kills):
        kind = kinds[i % 3] if i < 3 else rng.choice(kinds)
        done = max(step_losses(run_dir), default=0)
        room = max(1, (args.steps - 2 - done) // (args.kills - i))  # leave steps for the kills still to come
        target = rng.randint(done + 1, done + room)
        procs = start(run_dir, data, args.steps, work / "chaos")
        killed = run_until(procs, _condition(kind, run_dir, target, 4), args.timeout)
        restarts += 1
        if not killed:
            print(f"kill {i + 1}: the run finished before the {kind} moment after step {target}; no more kills")
            break
        print(f"kill {i + 1}: SIGKILL {kind:4s} at step {max(step_losses(run_dir), default=0)} "
              f"(target {target}); checkpoints: {sorted(p.name for p in (run_dir / 'checkpoints').iterdir())}"
              if (run_dir / "checkpoints").is_dir() else f"kill {i + 1}: SIGKILL {kind} before any checkpoint",
              flush=True)
    procs = start(run_dir, data, args.steps, work / "chaos")
    codes = [p.wait(timeout=args.timeout) for p in procs]
    got = step_losses(run_dir)
    same = codes == [0, 0] and got == reference
    diff = {s: (got.get(s), reference.get(s)) for s in sorted(set(got) | set(reference)) if got.get(s) != reference.get(s)}
    print(f"restarts: {restarts}; final exit codes {codes}; steps {len(got)}/{len(reference)}; "
          f"per-step losses {'bit-identical' if same else f'DIFFER at {diff}'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
