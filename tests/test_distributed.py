"""launch.distributed: environment parsing (torchrun, Slurm, submitit, single) and 2 real gloo processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.distributed import DistributedEnvError, detect_env, expand_nodelist, port_from_job_id

ROOT = Path(__file__).resolve().parents[1]


def test_single_process():
    env = detect_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_torchrun_variables():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes) == (3, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("10.1.2.3", 1234, "torchrun")


def test_slurm_step_variables():
    environ = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "2", "SLURM_NODELIST": "gpu-a[07-08],gpu-b[1,3]", "SLURM_JOB_ID": "4242",
               "SLURM_TASKS_PER_NODE": "2(x4)"}
    env = detect_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 2)
    assert (env.node_rank, env.num_nodes, env.source) == (2, 4, "slurm")
    assert env.master_addr in ("gpu-a07",)  # no scontrol here: falls back to the node name
    assert env.master_port == port_from_job_id("4242") and 20000 <= env.master_port < 60000


def test_batch_shell_is_not_a_task():
    # Inside the sbatch script (no srun step) SLURM_PROCID=0/SLURM_NTASKS=N must not mean "rank 0 of N".
    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_ID": "9"})
    assert env.world_size == 1 and env.source == "single"


def test_nodelist_expansion():
    assert expand_nodelist("node[1-3,7]") == ["node1", "node2", "node3", "node7"]
    assert expand_nodelist("a[01-02],b") == ["a01", "a02", "b"]
    assert expand_nodelist("single") == ["single"]


@pytest.mark.parametrize("environ, msg", [
    ({"RANK": "4", "WORLD_SIZE": "2"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}, "NODELIST"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NODELIST": "n1"}, "SLURM_NTASKS"),
])
def test_bad_environments(environ, msg):
    with pytest.raises(DistributedEnvError, match=msg):
        detect_env(environ)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SUBMITIT"))}
    return {**env, **extra}


def _launch_two(env_for_rank, timeout=120):
    base = _clean_env()
    procs = [subprocess.Popen([sys.executable, "-m", "launch.distributed"], cwd=ROOT,
                              env={**base, **env_for_rank(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_processes_torchrun_style():
    port = str(_free_port())
    res = _launch_two(lambda r: {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["ok"] and r["backend"] == "gloo" and r["allreduce"] == 3.0 for r in res)


def test_two_real_processes_slurm_style():
    # What srun gives two tasks of a one-node step; the rendezvous port comes from the job id.
    job = str(_free_port() - 20000 + 40000 * 3)  # a job id whose derived port is free
    res = _launch_two(lambda r: {"SLURM_STEP_ID": "0", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2",
                                 "SLURM_LOCALID": str(r), "SLURM_NODEID": "0", "SLURM_NODELIST": "node1",
                                 "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": job})
    assert [r["source"] for r in res] == ["slurm", "slurm"]
    assert [r["rank"] for r in res] == [0, 1] and all(r["ok"] for r in res)
    assert res[0]["master_port"] == port_from_job_id(job)


GLOO_THREADS = """
def gloo_threads():
    return sum("gloo" in open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task"))
"""


def test_group_is_freed_although_timm_and_deepspeed_are_imported_after_init():
    # Both bind group.WORLD as a default argument at import; imported after init_process_group that kept
    # the group (and its gloo threads) alive into interpreter shutdown. init_distributed imports them first.
    code = "import os\n" + GLOO_THREADS + """
import gc, torch.distributed as dist
from launch.distributed import init_distributed
init_distributed("gloo")
import timm, deepspeed, models
assert gloo_threads() > 0
dist.destroy_process_group(); gc.collect()
print("threads after destroy", gloo_threads())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "threads after destroy 0" in r.stdout, r.stdout


def test_exit_process_keeps_the_code_flushes_and_skips_teardown(tmp_path):
    # Two ranks whose default group stays referenced (as DeepSpeed's engine does after training): gloo
    # threads live at exit. exit_process must give the exact code every time (interpreter teardown with
    # live gloo threads aborted about one 2-rank exit in six), flush the log, and skip atexit teardown.
    code = """
import atexit, logging, os, sys
import torch, torch.distributed as dist
from launch.distributed import exit_process, init_distributed
init_distributed("gloo")
KEEP = dist.group.WORLD
t = torch.ones(1); dist.all_reduce(t)
dist.destroy_process_group()
atexit.register(lambda: open(os.environ["MARK"], "w").write("teardown ran"))
logging.basicConfig(level=logging.INFO)
logging.getLogger("t").info("rank %s done sum=%s", os.environ["RANK"], t.item())
print("stdout buffered", end="")
exit_process(3)
"""
    for attempt in range(6):
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env=_clean_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=port, MARK=str(tmp_path / f"mark{attempt}{r}")))
                 for r in range(2)]
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            assert p.returncode == 3, (attempt, r, p.returncode, err[-2000:])
            assert out == "stdout buffered" and f"rank {r} done sum=2.0" in err, (out, err[-2000:])
            assert not (tmp_path / f"mark{attempt}{r}").exists()
