"""A requeued Slurm job that comes back on fewer nodes continues (local 2-node cluster, tests/slurm_cluster.py).

``sbatch --nodes=1-2 --ntasks-per-node=2 slurm/pretrain_vil_base_in21k.sh`` while both nodes are idle starts on
2 nodes (world 4, micro 4, ``train.global_batch=16``: grad_accum 1). Once it has logged K steps, node2 is
drained and the job gets USR1 (the time-limit path of tests/test_slurm.py): it checkpoints, exits 85 and
slurm/common.sh requeues it. The requeued job can only get node1 (world 2: grad_accum 2), resumes the
checkpoint there (pretrain/elastic.py, DeepSpeed's universal checkpoint for the ZeRO-1 partitions) and
finishes. Its losses are compared with an uninterrupted 2-node run (``--nodes=2``, world 4) step by step.

Why 2 tasks per node and not 1: Slurm gives a range job at most min x tasks-per-node nodes (measured on
22.05), so ``--nodes=1-2 --ntasks-per-node=1`` never gets 2 nodes. And why the requeue needs slurm/common.sh's
``hvp_requeue``: Slurm keeps a requeued job's task count at its last allocation's (4), so without the reset
the job would wait for node2 forever (Reason=ReqNodeNotAvail).

Tolerance: steps up to the resume run on the same world as the reference, so they must be identical. After
it, one rank sums two micro-batch gradients and then all-reduces over 2 ranks, where the reference
all-reduces 4: another order of float additions, so equality is not guaranteed; 1e-5 relative is allowed
(tests/test_elastic.py measured 0 for two micro-batches per rank and <= 1e-7 for four).
"""
from __future__ import annotations

import json
import time

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
from test_slurm import ROOT, SCRIPT, Run, _wait_done, demo_data, tiny_overrides  # noqa: F401  (demo_data: fixture)

pytestmark = pytest.mark.cluster

STEPS, K, G, MICRO = 12, 4, 16, 4
REL_TOL = 1e-5
SHAPE = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15", "--signal=USR1@60"]


def overrides(data) -> list[str]:
    # tiny_overrides + what keeps a sample's randomness independent of the rank that reads it: no drop path,
    # the torch pipeline (crop/flip from (seed, epoch, sample)); mixup/cutmix are already off there.
    return [*tiny_overrides(data), f"train.max_steps={STEPS}", f"train.micro_batch={MICRO}",
            f"train.global_batch={G}", "model.drop_path=0", "data.pipeline=torch", "log.every_steps=1"]


def submit(cluster, base, name, data, nodes, *extra) -> Run:
    env = dict(cluster.env, RUNS_ROOT=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = Run(name, base / name)
    run.job_id = cluster.sbatch(SCRIPT, *overrides(data), *extra,
                                options=["-J", name, "--output", f"{base}/%x-%j.out", "--error", f"{base}/%x-%j.err",
                                         f"--nodes={nodes}", *SHAPE], cwd=ROOT, env=env)
    run.log = base / f"{name}-{run.job_id}.err"
    return run


def test_requeued_job_continues_on_fewer_nodes(slurm_cluster, demo_data, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    ela = submit(cluster, tmp_path, "ela", demo_data, "1-2")
    drained = False
    try:
        cluster.wait_job(ela.job_id, timeout=60, states={"RUNNING"})
        assert cluster.job_info(ela.job_id)["NumNodes"] == "2", \
            f"--nodes=1-2 started on fewer than 2 nodes (are both nodes idle?): {cluster.job_info(ela.job_id)}"
        ref = submit(cluster, tmp_path, "ref", demo_data, "2")  # uninterrupted, world 4 (fits beside ela)
        cluster.wait_for(lambda: ela.steps_logged() >= K, timeout=240, what=f"ela logs {K} steps", jobid=ela.job_id)
        cluster.run(["scontrol", "update", "nodename=node2", "state=drain", "reason=test_slurm_elastic"])
        drained = True
        cluster.run(["scancel", "--signal=USR1", "--full", ela.job_id])
        cluster.wait_for(lambda: "restart 1 on" in ela.log_text(), timeout=120, what="ela restarts after the requeue",
                         jobid=ela.job_id)
        cluster.run(["scontrol", "update", "nodename=node2", "state=resume"])  # back for other tests at once
        drained = False
        info = _wait_done(cluster, ela, timeout=300)
        ref_info = _wait_done(cluster, ref, timeout=300)
    finally:
        if drained:
            cluster.run(["scontrol", "update", "nodename=node2", "state=resume"], check=False)

    assert info["ExitCode"] == ref_info["ExitCode"] == "0:0", (info, ref_info)
    text = ela.log_text()
    assert int(info.get("Restarts", 0)) == 1 and info["NumNodes"] == "1", info
    assert "restart 0 on node[1-2]: 2 nodes x 2 tasks (world 4)" in text, text[-5000:]
    assert "training step exited with 85" in text and "requeued job's task count set to 2" in text, text[-5000:]
    assert "restart 1 on node1: 1 nodes x 2 tasks (world 2)" in text, text[-5000:]
    resumed = [line for line in text.splitlines() if "from world 4 onto world 2, grad_accum 1 -> 2" in line]
    assert resumed and f"(global batch {G} kept)" in resumed[0], text[-5000:]
    step = int(resumed[0].split("resumed step ")[1].split()[0])
    assert K <= step < STEPS, resumed[0]
    done = json.loads((ela.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").read_text())
    assert done["world_size"] == 2, done

    got, want = ela.losses(), ref.losses()
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1)), (sorted(got), sorted(want))
    before = {s: got[s] for s in range(1, step + 1) if got[s] != want[s]}
    assert not before, f"steps before the resume differ from the same-world reference: {before}"
    rel = {s: abs(got[s] - want[s]) / abs(want[s]) for s in range(step + 1, STEPS + 1)}
    print(f"resumed at step {step} (world 4 -> 2); relative loss difference to the uninterrupted world-4 run "
          "after the resume:", json.dumps({s: f"{d:.1e}" for s, d in rel.items()}))
    assert max(rel.values()) <= REL_TOL, rel
    assert not (ela.run_dir / ".slurm-job.lock").exists()


def test_size_that_cannot_give_the_global_batch_fails_without_requeue(slurm_cluster, demo_data,  # noqa: F811
                                                                      tmp_path):
    """G = 12 with micro 4 fits neither world 4 nor world 2: refused (exit 2) before the run dir is written,
    and exit 2 is not a requeue (a requeue would fail the same way forever)."""
    run = submit(slurm_cluster, tmp_path, "bad", demo_data, "1-2", "train.global_batch=12")
    state = slurm_cluster.wait_job(run.job_id, timeout=180)
    info = slurm_cluster.job_info(run.job_id)
    text = run.log_text()
    assert state == "FAILED" and info["ExitCode"] == "2:0", (state, info, text[-4000:])
    assert info.get("Restarts", "0") == "0", info
    assert "config key 'train.global_batch'=12 cannot be reached with micro_batch 4" in text, text[-4000:]
    assert "training step exited with 2" in text and "requeued" not in text, text[-4000:]
    assert not (run.run_dir / "checkpoints").exists() and not (run.run_dir / ".slurm-job.lock").exists()
