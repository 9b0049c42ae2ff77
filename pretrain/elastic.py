"""Resume a run on another number of processes (a requeued 8-node job that comes back on 6 nodes).

What stays: the global batch ``G`` of the run (``grad_accum`` becomes ``G / (micro_batch * world)``; unless
``train.global_batch`` is set, the checkpoint's ``G`` wins over the config's ``grad_accum``, so a job
requeued twice on a smaller allocation keeps it too), so the lr schedule continues by global step and the
data loader continues at the same global position (it is "global samples consumed in the epoch", the
same number on any world size). The EMA weights are whole in every checkpoint and load as they are.
What changes: the ZeRO partitions of the optimizer and parameter state. Those are DeepSpeed's format, so
DeepSpeed re-partitions them: its ``ds_to_universal`` conversion writes a *universal checkpoint* (one
folder per parameter with its fp32 value and optimizer moments) that an engine started with
``{"checkpoint": {"load_universal": true}}`` loads on any data-parallel size. The conversion runs once, on
rank 0, into ``RUN/checkpoints/step_X/universal/`` (inside the tag, so it is rotated and set aside with
it) and later resumes from that tag reuse it. A stage-0 fp32 checkpoint has no partitions (the whole
optimizer state is in its model-states file) and loads directly.

Per-rank loop state on the new world: the data position is global, so rank ``r`` reads the loader state
of saved rank ``r % saved_world`` (any rank's state names the same position). RNG streams (drop-path
masks, mixup draws): ranks that existed keep their own saved stream; a rank that did not exist gets a
fresh generator seeded from ``(seed, rank, step)``. Copying rank ``r % saved_world``'s state instead would
give two ranks identical drop-path masks and mixup draws for the rest of the run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain import safeload
from pretrain.config import Config, ConfigError, resolve_grad_accum
from pretrain.rundir import CheckpointError, client_state_file, load_engine_state, rng_state, saved_world_size

log = logging.getLogger("pretrain")

UNIVERSAL = "universal"  # the converted checkpoint's folder inside a tag folder


@dataclasses.dataclass
class Reshape:
    """How this job differs from the one that wrote the checkpoint it resumes."""
    saved_world: int
    world: int
    global_batch: int
    old_accum: int  # what the config gave for this world
    grad_accum: int  # what keeps the global batch
    universal: bool  # the optimizer state is partitioned: load through DeepSpeed's universal checkpoint


def saved_layout(tag_dir: Path) -> dict | None:
    """``{global_batch, micro_batch, grad_accum, world_size}`` of the job that wrote the tag, from rank 0's
    loader state (None when it cannot be read: verification then sets the tag aside)."""
    try:
        sd = safeload.load(client_state_file(tag_dir, 0))["loader"]
        micro, accum, world = int(sd["micro_batch"]), int(sd.get("grad_accum", 1)), int(sd["world_size"])
        return {"global_batch": int(sd.get("global_batch", micro * accum * world)), "micro_batch": micro,
                "grad_accum": accum, "world_size": world}
    except Exception:  # noqa: BLE001 - unreadable or foreign: left to verification
        return None


def partitioned(tag_dir: Path) -> bool:
    """DeepSpeed wrote per-rank optimizer partitions (ZeRO 1/2/3, or its bf16 optimizer at stage 0); a
    stage-0 fp32 checkpoint keeps the whole optimizer in the model-states file and loads on any size."""
    return bool(glob.glob(str(Path(tag_dir) / "*optim_states.pt")))


def plan(cfg: Config, ckpt_dir: Path, tag: str, world: int) -> Reshape | None:
    """Before anything is written: None when this job resumes the tag as it is; else the new layout. A layout
    that cannot reach the run's global batch is a ConfigError (one line naming what would work)."""
    tag_dir = Path(ckpt_dir) / tag
    try:
        saved_world = saved_world_size(ckpt_dir, tag)
    except CheckpointError:
        return None  # left to verification, which falls back to an older checkpoint
    saved = saved_layout(tag_dir)
    t = cfg.train
    if saved is None or saved["world_size"] != saved_world:
        if saved_world != world:
            raise CheckpointError(f"checkpoint {tag_dir} was written by {saved_world} processes, this job has "
                                  f"{world}, and its loader state (client_rank0.pt) cannot be read to find its "
                                  "global batch. Nothing was modified.")
        return None
    G = saved["global_batch"]
    if t.global_batch:
        # a recipe that fixes the global batch: resolve_grad_accum already derived grad_accum from it
        if saved_world == world:
            return None
        G, accum = t.global_batch, t.grad_accum
    else:
        if saved_world == world and t.micro_batch * t.grad_accum * world == G:
            return None
        try:
            accum = resolve_grad_accum(dataclasses.replace(t, global_batch=G, grad_accum=1), world)
        except ConfigError as e:
            raise ConfigError(f"cannot resume {tag_dir} (written by {saved_world} processes, global batch {G}) "
                              f"on {world}: {e}. Nothing was modified.") from None
    return Reshape(saved_world, world, G, t.grad_accum, accum, saved_world != world and partitioned(tag_dir))


def apply(cfg: Config, reshape: Reshape | None) -> Config:
    """The config with the grad_accum that keeps the run's global batch."""
    if reshape is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=reshape.grad_accum))


def deepspeed_config(conf: dict, reshape: Reshape | None) -> dict:
    """DeepSpeed's config with its universal-checkpoint loading switched on when the partitions change."""
    if reshape is not None and reshape.universal:
        conf = dict(conf, checkpoint={**conf.get("checkpoint", {}), "load_universal": True})
    return conf


def convert(tag_dir: Path) -> Path:
    """Collective: ``tag_dir/universal`` (DeepSpeed's universal checkpoint of the tag), converted once by
    rank 0 with DeepSpeed's ``ds_to_universal`` while the others wait. Our checkpoints carry no
    ``universal_checkpoint_info`` (only models that declare one, like Megatron's, do), so the conversion
    injects DeepSpeed's default (``inject_missing_state``). Written to a temporary name and renamed, so a
    crash leaves no half folder that looks converted."""
    out = Path(tag_dir) / UNIVERSAL
    error = None
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = out.with_name(UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        chatter = io.StringIO()
        try:
            from deepspeed.checkpoint import ds_to_universal

            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                    safeload.weights_only_loads():
                ds_to_universal.main(args)
            os.replace(tmp, out)
            log.info("converted %s to DeepSpeed's universal checkpoint %s", tag_dir, out)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"DeepSpeed's universal conversion of {tag_dir} failed: {type(e).__name__}: {e}"
            log.error("%s\n%s", error, chatter.getvalue()[-3000:])
            shutil.rmtree(tmp, ignore_errors=True)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])
    return out


def load(ckpt, tag: str, engine, reshape: Reshape, rank: int, seed: int) -> tuple[dict, dict]:
    """Collective: restore a checkpoint written by another world size. Returns (common client state, the
    loop state this rank continues with)."""
    tag_dir = Path(ckpt.ckpt_dir) / tag
    saved_world = saved_world_size(ckpt.ckpt_dir, tag)
    if reshape.universal:
        load_dir, load_tag = tag_dir, convert(tag_dir).name
    else:
        load_dir, load_tag = Path(ckpt.ckpt_dir), tag
    # Two things DeepSpeed's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_
    # stage3) gets wrong with more than one param group, both undone below (measured: without them the loss
    # is off by 6e-4 one step after the resume, with them it is identical):
    # - every group gets the hyperparameters of the first saved group ("the hyperparameters of each
    #   parameter should be the same"): norms and biases (weight_decay 0) would be decayed and layer-wise
    #   lr scales flattened. Ours come from the config, not from training: the groups get back the ones the
    #   optimizer was built with.
    # - every group's optimizer state gets the *same* ``step`` tensor, which torch's Adam increments in place
    #   once per group per step, so the bias correction runs ahead: each group gets its own copy.
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    common = load_engine_state(engine, load_dir, load_tag)
    for g, built in zip(engine.optimizer.param_groups, groups):
        g.update(built)
    for st in getattr(engine.optimizer, "state", {}).values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    rank_state = safeload.load(client_state_file(tag_dir, rank % saved_world))
    if rank >= saved_world:
        rank_state = dict(rank_state, rng=fresh_rng_state(seed, rank, int(common["step"])))
    if rank == 0:
        log.info("resumed step %d from world %d onto world %d, grad_accum %d -> %d (global batch %d kept)%s",
                 common["step"], saved_world, reshape.world, saved_accum(tag_dir, reshape), reshape.grad_accum,
                 reshape.global_batch, " via DeepSpeed's universal checkpoint" if reshape.universal else "")
    return common, rank_state


def saved_accum(tag_dir: Path, reshape: Reshape) -> int:
    saved = saved_layout(tag_dir)
    return saved["grad_accum"] if saved else reshape.old_accum


def fresh_rng_state(seed: int, rank: int, step: int) -> dict:
    """RNG states for a rank the checkpoint had no stream for: seeded from (seed, rank, step), distinct from
    every saved stream and the same on a rerun. Returned in :func:`pretrain.rundir.rng_state`'s format."""
    s = np.random.SeedSequence([int(seed), int(rank), int(step), 0xE1A5]).generate_state(2)
    saved = rng_state()
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(s[0]) << 32 | int(s[1]))
    fresh = rng_state()
    from pretrain.rundir import set_rng_state

    set_rng_state(saved)
    return fresh
