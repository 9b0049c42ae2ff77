"""The DeepSpeed engine with 2 real processes (gloo, CPU): ZeRO stages, exact resume after kill -9,
signal -> checkpoint -> resume, crash during a checkpoint write, non-finite losses, world-size change,
TensorBoard events."""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from engine_utils import TINY, make_demo_shards, run_ranks, step_losses, wait_for_steps, Ranks
from pretrain.rundir import COMPLETE, complete_tags, latest_complete


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_demo_shards(tmp_path_factory.mktemp("demo") / "data")


def args_for(shards, run_dir, *extra):
    return ["--config", "pretrain/configs/demo.yaml", f"run.dir={run_dir}", f"data.train={shards}#train",
            f"data.eval={shards}#val", *TINY, *extra]


def precision_args(precision: str) -> list[str]:
    """bf16 runs use ViL-Tiny with one block per stage at 32 px: on CPUs without AVX512-BF16/AMX (CI's may be
    AVX2-only) PyTorch emulates bf16 about 8x slower than fp32, and the engine's bf16 paths (DeepSpeed's bf16
    optimizer, ZeRO partitions of bf16 weights with fp32 masters) do not depend on depth or input size.
    Measured on a 2-core AVX2-only EPYC, one 8-step ZeRO-3 bf16 launch: 25 s at 64 px, 19 s at 32 px."""
    if precision == "bf16":
        return ["precision=bf16", "model.kwargs={depths: [1, 1, 1, 1]}", "model.img_size=32"]
    return [f"precision={precision}"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Uninterrupted runs, one per (stage, precision) used below: step -> loss."""
    cache = {}

    def get(stage, precision, steps=8):
        key = (stage, precision, steps)
        if key not in cache:
            run = tmp_path_factory.mktemp(f"ref{stage}{precision}")
            run_ranks(args_for(shards, run, f"deepspeed.zero_stage={stage}", *precision_args(precision),
                               f"train.max_steps={steps}", "checkpoint.every_steps=2"))
            cache[key] = (run, step_losses(run))
        return cache[key]
    return get


FULL_MATRIX = [(st, pr) for st in (1, 2, 3) for pr in ("bf16", "fp32")]
CI_MATRIX = [(3, "bf16")]  # the rest runs with -m slow (tests/test_chaos.py kills ZeRO-1 fp32 runs)


@pytest.mark.parametrize("stage, precision", [
    p if p in CI_MATRIX else pytest.param(*p, marks=pytest.mark.slow) for p in FULL_MATRIX])
def test_kill9_restart_is_bit_exact(shards, reference, tmp_path, stage, precision):
    ref_dir, ref = reference(stage, precision)
    assert sorted(ref) == list(range(1, 9)) and all(v == v for v in ref.values())
    run = tmp_path / "run"
    common = args_for(shards, run, f"deepspeed.zero_stage={stage}", *precision_args(precision),
                      "train.max_steps=8", "checkpoint.every_steps=2")
    ranks = Ranks(common)
    wait_for_steps(run, 5, ranks)  # mid-epoch, past the checkpoint at step 4
    ranks.kill()
    assert latest_complete(run / "checkpoints") in ("step_00000004", "step_00000006")
    run_ranks(common)
    got = step_losses(run)
    assert got == ref, f"resumed losses differ from the uninterrupted run:\n{got}\n{ref}"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000008"


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2])  # ZeRO-0: its own reference
def test_other_stages_save_load_exact(shards, reference, tmp_path, stage):          # run too (~60 s)
    """ZeRO 0 and 2 (bf16) by save/load: a planned stop at step 4 (train.stop_at_step), then resume."""
    _, ref = reference(stage, "bf16")
    run = tmp_path / "run"
    base = args_for(shards, run, f"deepspeed.zero_stage={stage}", *precision_args("bf16"), "checkpoint.every_steps=100",
                    "train.max_steps=8")
    run_ranks(base + ["train.stop_at_step=4"])
    assert latest_complete(run / "checkpoints") == "step_00000004"
    run_ranks(base)
    assert step_losses(run) == ref


def test_crash_in_a_checkpoint_write_and_corrupt_checkpoints_resume_exactly(shards, reference, tmp_path):
    """One run, two failures. A crash while the step-8 checkpoint is written leaves its folder without a
    completion record and `latest` on step 6. Then `latest` names a missing tag, the step-6 checkpoint gets
    a truncated file and the step-4 one a garbled COMPLETE: resume says why for each, sets them aside as
    corrupt-*, continues from the newest good one (step 2), rewrites steps 4..8 and reproduces the
    uninterrupted run's losses."""
    _, ref = reference(1, "fp32")
    run = tmp_path / "run"
    base = args_for(shards, run, "deepspeed.zero_stage=1", "precision=fp32", "checkpoint.every_steps=2",
                    "checkpoint.keep=3", "train.max_steps=8")
    r = run_ranks(base, env={"HVP_FAULT_CRASH_IN_CKPT": "8"}, expect=None)
    assert all(c != 0 for c in [p.returncode for p in r.procs])
    ck = run / "checkpoints"
    assert (ck / "step_00000008").is_dir() and not (ck / "step_00000008" / COMPLETE).exists()
    assert latest_complete(ck) == "step_00000006"
    assert (ck / "latest").read_text() == "step_00000006"
    assert complete_tags(ck) == ["step_00000002", "step_00000004", "step_00000006"]
    record = json.loads((ck / "step_00000006" / COMPLETE).read_text())
    assert record["world_size"] == 2 and all(set(v) == {"size", "crc32"} for v in record["files"].values())
    victim = sorted((ck / "step_00000006").glob("*optim_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    (ck / "step_00000004" / COMPLETE).write_text("garbage")
    (ck / "latest").write_text("step_00000099")
    r = run_ranks(base)
    out = r.output(0)
    assert "names 'step_00000099', which is not a complete checkpoint" in out
    assert f"{victim.name} has" in out and "not a completion record" in out
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("corrupt-")) == [
        "corrupt-step_00000004", "corrupt-step_00000006"]
    assert step_losses(run) == ref
    assert complete_tags(ck)[-1] == "step_00000008" and (ck / "latest").read_text() == "step_00000008"


def test_stages_agree(reference):
    """ZeRO 1, 2 and 3 partition the same computation: fp32 losses agree closely across stages (only the
    order of the gradient reductions differs), bf16 within bf16's rounding. ZeRO-1 and 3 in fp32, 2 and 3
    in bf16: one run more than the other tests' references (ZeRO-2 fp32: the slow test below)."""
    fp32 = {stage: reference(stage, "fp32")[1] for stage in (1, 3)}
    for k in fp32[1]:
        assert fp32[3][k] == pytest.approx(fp32[1][k], rel=1e-5), k
    _, r3 = reference(3, "bf16")
    _, r2 = reference(2, "bf16")
    for k in r3:
        assert r3[k] == pytest.approx(r2[k], rel=2e-2)


@pytest.mark.slow  # one more reference run (ZeRO-2 fp32) than the default set needs
def test_zero2_fp32_agrees_with_zero1(reference):
    fp32 = {stage: reference(stage, "fp32")[1] for stage in (1, 2)}
    for k in fp32[1]:
        assert fp32[2][k] == pytest.approx(fp32[1][k], rel=1e-5), k


def test_signal_checkpoints_and_exits_for_requeue(shards, reference, tmp_path):
    from launch.signals import EXIT_REQUEUE

    ref_dir, ref = reference(3, "bf16")
    run = tmp_path / "run"
    common = args_for(shards, run, "deepspeed.zero_stage=3", *precision_args("bf16"), "train.max_steps=8",
                      "checkpoint.every_steps=100")
    ranks = Ranks(common)
    wait_for_steps(run, 3, ranks)
    ranks.signal(signal.SIGUSR1)
    codes = ranks.wait(300)
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], ranks.output()
    tag = latest_complete(run / "checkpoints")
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < 8
    run_ranks(common)
    assert step_losses(run) == ref


def test_nonfinite_steps_are_skipped_then_stop(shards, tmp_path):
    run = tmp_path / "skip"
    base = args_for(shards, run, "deepspeed.zero_stage=2", *precision_args("bf16"), "checkpoint.every_steps=2")
    run_ranks(base + ["train.max_steps=4"], env={"HVP_FAULT_NAN_STEPS": "3"})
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert max(e.value for e in ea.Scalars("train/skipped_steps")) == 1

    run2 = tmp_path / "stop"
    base2 = args_for(shards, run2, "deepspeed.zero_stage=2", *precision_args("bf16"), "checkpoint.every_steps=2",
                     "train.max_nonfinite=3", "train.max_steps=8")
    r = run_ranks(base2, env={"HVP_FAULT_NAN_STEPS": "3,4,5,6,7,8"}, expect=1)
    assert "non-finite losses in a row" in r.output(0)
    assert complete_tags(run2 / "checkpoints") == ["step_00000002"]


def test_world_size_change_fails_clearly_before_touching(shards, reference, tmp_path):
    """Another world size resumes (tests/test_elastic.py) when it can keep the global batch (here 2 x 8 = 16);
    1 process with micro_batch 3 cannot: refused with one line, nothing touched (a copy of a 2-process
    run's directory)."""
    run = tmp_path / "run"
    shutil.copytree(reference(2, "bf16")[0], run)
    base = args_for(shards, run, "deepspeed.zero_stage=2", *precision_args("bf16"), "checkpoint.every_steps=2")
    before = sorted(p.name for p in (run / "checkpoints").rglob("*"))
    r = run_ranks(base + ["train.max_steps=12", "train.micro_batch=3"], nproc=1, expect=2)
    assert "written by 2 processes, global batch 16) on 1: " in r.output(0)
    assert "train.micro_batch= one of [1, 2, 4, 8, 16]" in r.output(0)
    assert sorted(p.name for p in (run / "checkpoints").rglob("*")) == before


def test_tensorboard_and_run_dir(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = reference(3, "bf16")
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    for t in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "train/data_wait_frac",
              "eval/top1", "eval/top5"):
        assert t in tags["scalars"], t
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))
    assert "train/first_batch" in tags["images"]
    assert (run / "config.yaml").is_file()
    lrs = [e.value for e in ea.Scalars("train/lr")]
    assert lrs[1] > lrs[0] and lrs[-1] < max(lrs)  # warm-up then cosine decay


@pytest.mark.slow  # the Slurm and submitit paths of the same lock run by default (tests/test_slurm.py)
def test_second_job_in_same_run_dir_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    common = args_for(shards, run, "deepspeed.zero_stage=1", "precision=fp32", "train.max_steps=200",
                      "checkpoint.every_steps=1000")
    first = Ranks(common)
    try:
        wait_for_steps(run, 1, first)
        second = run_ranks(common, expect=1)
        assert "in use by another live job" in second.output(0)
    finally:
        first.kill()


def test_bad_config_refused_before_start(tmp_path):
    r = run_ranks(["--config", "pretrain/configs/demo.yaml", f"run.dir={tmp_path}/x", "model.name=nope_net",
                   "train.max_steps=1"], nproc=1, expect=2)
    assert "unknown model 'nope_net'" in r.output(0)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("offload, stage", [("optimizer", 2), ("both", 3)])
def test_offload_trains_and_resumes(shards, tmp_path, offload, stage):
    """ZeRO-Offload with our client optimizer (may compile DeepSpeed ops: outside CI's default set)."""
    run = tmp_path / "run"
    base = args_for(shards, run, f"deepspeed.zero_stage={stage}", f"deepspeed.offload={offload}",
                    "precision=fp32", "checkpoint.every_steps=2", "train.max_steps=4")
    run_ranks(base + ["train.stop_at_step=2"], timeout=900)
    run_ranks(base, timeout=900)
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
