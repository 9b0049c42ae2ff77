"""Resume on another number of processes (pretrain/elastic.py): 2 real gloo processes, fp32, tiny ViL.

The global batch G = 8 stays: 2 ranks x micro 4 x grad_accum 1 <-> 1 rank x micro 4 x grad_accum 2. The
same global batches follow (same data position, same keys) and the losses match an uninterrupted 2-rank
run within 1e-5 relative at every step. Measured (fp32, CPU): with two micro-batches per global batch the
losses are bit-identical (a sum of two gradients has one addition, and DeepSpeed's 1/2 scaling is exact);
with four (micro 2: grad_accum 4 on 1 rank, 2 on 2 ranks) 1e-8..1e-7, because one rank sums
((a+b)+c)+d where two ranks sum (a+c)+(b+d) and float addition is not associative.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from engine_utils import TINY, make_demo_shards, run_ranks, step_losses
from pretrain.rundir import COMPLETE, client_state_file, latest_complete

# TINY without the randomness that differs per rank stream (drop path, mixup/cutmix), in fp32
ELASTIC = TINY + ["model.drop_path=0", "aug.mixup=0", "aug.cutmix=0", "precision=fp32"]
REL_TOL = 1e-5
G = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_demo_shards(tmp_path_factory.mktemp("demo") / "data")


def args_for(shards, run_dir, stage, *extra, micro=4, precision="fp32"):
    ema = ["train.ema=0.9"] if stage != 3 else []  # EMA is refused with ZeRO-3 (partitioned parameters)
    return ["--config", "pretrain/configs/demo.yaml", f"run.dir={run_dir}", f"data.train={shards}#train",
            f"data.eval={shards}#val", *ELASTIC, f"train.micro_batch={micro}", f"deepspeed.zero_stage={stage}",
            f"precision={precision}", "train.max_steps=12", "checkpoint.every_steps=6", *ema, *extra]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Uninterrupted 2-rank runs to step 12 (G = 8), one per (ZeRO stage, micro-batch): (run dir, step -> loss)."""
    cache = {}

    def get(stage, micro=4, precision="fp32"):
        if (stage, micro, precision) not in cache:
            run = tmp_path_factory.mktemp(f"ref{stage}_{micro}_{precision}")
            run_ranks(args_for(shards, run, stage, f"train.grad_accum={G // (2 * micro)}", micro=micro,
                               precision=precision))
            cache[stage, micro, precision] = (run, step_losses(run))
        return cache[stage, micro, precision]
    return get


def loader_position(run, tag):
    sd = torch.load(client_state_file(run / "checkpoints" / tag, 0), weights_only=True)["loader"]
    return sd["epoch"], sd["samples"], sd["global_batch"]


def rel_diffs(got, ref, steps):
    return {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in steps}


def listing(run):
    return sorted((str(p.relative_to(run)), p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*"))


def check_resumed(run, ref_dir, ref, before, after, stage, micro, out):
    got = step_losses(run)
    assert sorted(got) == list(range(1, 13))
    diffs = rel_diffs(got, ref, range(1, 13))
    print(f"ZeRO-{stage} micro {micro} world {before} -> {after}: relative loss difference to the uninterrupted "
          "2-rank run per step (resume after 6):", json.dumps({s: f"{d:.1e}" for s, d in diffs.items()}))
    assert max(diffs.values()) <= REL_TOL, diffs
    assert (f"resumed step 6 from world {before} onto world {after}, grad_accum {G // (micro * before)} -> "
            f"{G // (micro * after)} (global batch {G} kept)") in out
    # same global position after 12 steps on either layout: the same samples were consumed
    assert loader_position(run, "step_00000012") == loader_position(ref_dir, "step_00000012")
    assert json.loads((run / "checkpoints" / "step_00000012" / COMPLETE).read_text())["world_size"] == after
    if stage != 3:  # the EMA continued from the checkpoint's (micro 2: rounding differences up to 3e-7 measured)
        from safetensors.torch import load_file

        ema, ref_ema = (load_file(str(d / "checkpoints" / "step_00000012" / "ema.safetensors")) for d in (run, ref_dir))
        assert ema.keys() == ref_ema.keys()
        for k in ema:
            torch.testing.assert_close(ema[k], ref_ema[k], rtol=REL_TOL, atol=1e-6)
    # one run directory, one TensorBoard curve: steps 1..12 once each (the event files of both jobs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert sorted(e.step for e in ea.Scalars("train/loss")) == list(range(1, 13))


def test_same_global_batches_on_1_and_2_ranks(shards):
    """data.order's records: 2 ranks x micro 4 and 1 rank x micro 4 x grad_accum 2 give the same keys for
    every global batch (what the resumed run consumes after step 6)."""
    from data.order import collect_order, global_batches

    two = global_batches(collect_order(f"{shards}#train", 2, 4, 1, pipeline="torch", workers=0))
    one = global_batches(collect_order(f"{shards}#train", 1, 4, 2, pipeline="torch", workers=0))
    assert len(two) >= 12 and two == one
    assert len({k for batch in two.values() for k in batch}) == 8 * len(two)  # no sample twice in the epoch


def run_split(shards, run, stage, before, after, micro, precision="fp32"):
    """Train on `before` ranks to step 6 (planned stop), resume on `after` ranks to step 12."""
    run_ranks(args_for(shards, run, stage, "train.stop_at_step=6", f"train.grad_accum={G // (micro * before)}",
                       micro=micro, precision=precision), nproc=before)
    assert latest_complete(run / "checkpoints") == "step_00000006"
    # grad_accum=1 in the config: derived from the checkpoint's global batch
    r = run_ranks(args_for(shards, run, stage, micro=micro, precision=precision), nproc=after)
    return r.output(0)


@pytest.mark.parametrize("stage, before, after, micro", [
    # shrinking is also what tests/test_slurm_elastic.py does on a real Slurm cluster (world 4 -> 2)
    pytest.param(2, 2, 1, 4, marks=pytest.mark.slow), (2, 1, 2, 4),
    pytest.param(1, 2, 1, 4, marks=pytest.mark.slow), pytest.param(1, 1, 2, 4, marks=pytest.mark.slow),
    pytest.param(3, 2, 1, 4, marks=pytest.mark.slow), pytest.param(3, 1, 2, 4, marks=pytest.mark.slow),
    pytest.param(0, 2, 1, 4, marks=pytest.mark.slow),
    # 4 micro-batches per global batch: summed in another order on 1 rank than on 2 (not bit-exact)
    pytest.param(2, 2, 1, 2, marks=pytest.mark.slow), pytest.param(3, 1, 2, 2, marks=pytest.mark.slow)])
def test_resume_on_other_world_size(shards, reference, tmp_path, stage, before, after, micro):
    ref_dir, ref = reference(stage, micro)
    run = tmp_path / "run"
    out = run_split(shards, run, stage, before, after, micro)
    check_resumed(run, ref_dir, ref, before, after, stage, micro, out)
    universal = run / "checkpoints" / "step_00000006" / "universal"
    assert universal.is_dir() == (stage > 0), "ZeRO partitions go through DeepSpeed's universal checkpoint"
    if stage > 0:
        assert (universal / "zero").is_dir()
        # a later resume from the same tag reuses the conversion (it is not redone)
        stamp = universal.stat().st_mtime_ns
        assert "universal checkpoint" in out
        run_ranks(args_for(shards, run, stage, "run.resume=" + str(run / "checkpoints" / "step_00000006"),
                           f"run.dir={tmp_path / 'again'}", "train.max_steps=7", micro=micro), nproc=after)
        assert universal.stat().st_mtime_ns == stamp
        assert abs(step_losses(tmp_path / "again")[7] - step_losses(run)[7]) <= REL_TOL * abs(ref[7])


@pytest.mark.slow
def test_bf16_resume_on_other_world_size(shards, reference, tmp_path):
    """ZeRO-1 in bf16 (DeepSpeed's bf16 master weights and fp32 gradient accumulation) from 2 ranks onto 1."""
    ref_dir, ref = reference(1, precision="bf16")
    run = tmp_path / "run"
    out = run_split(shards, run, 1, 2, 1, 4, precision="bf16")
    got = step_losses(run)
    diffs = rel_diffs(got, ref, range(1, 13))
    print("ZeRO-1 bf16 micro 4 world 2 -> 1: relative loss difference per step:",
          json.dumps({s: f"{d:.1e}" for s, d in diffs.items()}))
    assert "resumed step 6 from world 2 onto world 1, grad_accum 1 -> 2" in out
    assert max(diffs.values()) <= 1e-2, diffs


def test_impossible_layout_refused_before_touching(shards, reference, tmp_path):
    """G = 8 cannot be reached with micro_batch 3 on 1 process: one line naming what works, nothing written
    (a copy of the ZeRO-2 reference run's directory: 2 processes, checkpoints at steps 6 and 12)."""
    run = tmp_path / "run"
    shutil.copytree(reference(2)[0], run)
    before = listing(run)
    r = run_ranks(args_for(shards, run, 2, "train.max_steps=16", micro=3), nproc=1, expect=2)
    out = r.output(0)
    line = next(ln for ln in out.splitlines() if "cannot resume" in ln)
    assert "written by 2 processes, global batch 8" in line and "train.micro_batch= one of [1, 2, 4, 8]" in line
    assert listing(run) == before


def test_plan_names_the_world_sizes_that_work(tmp_path):
    """The refusal for a world size that cannot reach G names the ones that can (no processes needed: a
    checkpoint record as the trainer writes it)."""
    from pretrain.config import ConfigError, load_config
    from pretrain.elastic import plan

    tag = tmp_path / "checkpoints" / "step_00000006"
    tag.mkdir(parents=True)
    (tag / COMPLETE).write_text(json.dumps({"world_size": 2, "files": {}}))
    torch.save({"loader": {"micro_batch": 4, "grad_accum": 1, "world_size": 2, "global_batch": 8}, "rng": {}},
               client_state_file(tag, 0))
    cfg = load_config(None, ["train.max_steps=1", "train.micro_batch=4"])
    assert plan(cfg, tag.parent, tag.name, 2) is None
    assert plan(cfg, tag.parent, tag.name, 1).grad_accum == 2
    with pytest.raises(ConfigError, match=r"on 3 processes: use a world size in \[1, 2\]"):
        plan(cfg, tag.parent, tag.name, 3)
    # a checkpoint written on the smaller world (1 x 4 x grad_accum 2) resumed again there with the original
    # command line (grad_accum 1): the run's global batch 8 is kept, no re-partitioning needed
    (tag / COMPLETE).write_text(json.dumps({"world_size": 1, "files": {}}))
    torch.save({"loader": {"micro_batch": 4, "grad_accum": 2, "world_size": 1, "global_batch": 8}, "rng": {}},
               client_state_file(tag, 0))
    again = plan(cfg, tag.parent, tag.name, 1)
    assert (again.grad_accum, again.global_batch, again.universal) == (2, 8, False)
    os.remove(client_state_file(tag, 0))
    with pytest.raises(Exception, match="cannot be read"):
        plan(cfg, tag.parent, tag.name, 2)
