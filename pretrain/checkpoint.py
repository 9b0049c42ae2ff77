"""DeepSpeed checkpoints in the run directory, with a ``latest`` that only ever names a complete one.

Layout (DeepSpeed's own, under ``RUN/checkpoints/``):
    step_00000100/            DeepSpeed model/optimizer shards (any ZeRO stage)
    step_00000100/client_rank{r}.pt   this rank's loop state: RNG states, data-loader state
    step_00000100/ema.safetensors     EMA weights (when enabled)
    step_00000100/COMPLETE    written by rank 0 after every rank finished writing
    latest                    tag of the newest COMPLETE checkpoint (atomic rename)

DeepSpeed writes ``latest`` itself as soon as *its* files are written; we pass ``save_latest=False`` and
publish the tag only after our per-rank files exist and a barrier confirms them, so a crash at any point
leaves ``latest`` on the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
TAG_FMT = "step_{:08d}"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return TAG_FMT.format(step)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with the COMPLETE marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_complete(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag, else None."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, common_state: dict, rank_state: dict, keep: int,
         ema_state: dict | None = None, fault_hook=None) -> str:
    """Collective: every rank calls it. Returns the tag once it is complete and published."""
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=common_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(rank_state, ckpt_dir / tag / f"client_rank{rank}.pt")
    if ema_state is not None and rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()},
                  str(ckpt_dir / tag / "ema.safetensors"))
    if fault_hook is not None:
        fault_hook(tag)  # tests: die here, with DeepSpeed's files written but nothing published
    dist.barrier()
    if rank == 0:
        _write_atomic(ckpt_dir / tag / COMPLETE, f"{dist.get_world_size()}\n")
        _write_atomic(ckpt_dir / "latest", tag)
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        # partial tags (a crash during a write) older than the one just published are garbage too
        for p in ckpt_dir.iterdir():
            if p.is_dir() and not (p / COMPLETE).exists() and p.name < tag:
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return tag


def saved_world_size(ckpt_dir: Path, tag: str) -> int:
    return int((ckpt_dir / tag / COMPLETE).read_text().split()[0])


def check_world_size(ckpt_dir: Path, tag: str, world: int) -> None:
    """Refuse, before anything is loaded or written, a checkpoint written by another number of processes."""
    saved = saved_world_size(ckpt_dir, tag)
    if saved != world:
        raise CheckpointError(
            f"checkpoint {ckpt_dir / tag} was written by {saved} processes, this job has {world}. "
            f"Resume with {saved} processes, or start a new run from its weights with "
            f"finetune.init={ckpt_dir / tag} (model weights only). Nothing was modified.")


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict, dict]:
    """Collective: restore model/optimizer via DeepSpeed; returns (common client state, this rank's)."""
    check_world_size(ckpt_dir, tag, dist.get_world_size())
    path, common = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    # Our own files, written by this very pipeline (RNG states need pickle: numpy's state is a tuple).
    rank_state = torch.load(ckpt_dir / tag / f"client_rank{dist.get_rank()}.pt", weights_only=False)
    return common, rank_state
