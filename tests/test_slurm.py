"""The Slurm launch layer on a real local cluster (tests/slurm_cluster.py: 2 nodes on this host).

One module fixture submits four tiny CPU training runs of the real engine at once and drives them:
  * ``ref``: ``sbatch slurm/pretrain_vil_base_in21k.sh`` on 2 nodes x 1 task, uninterrupted (the reference);
  * ``sig``: the same, ``scancel --signal=USR1 --full`` once its train_log.jsonl has K lines
    (the time-limit signal, sent deterministically) -> checkpoint, exit 85, ``scontrol requeue``, resume;
  * ``pre``: ``python -m launch.submit`` (1 node x 2 tasks, time 30 min), ``job._interrupt()`` (preemption);
  * ``tmo``: ``python -m launch.submit`` (2 nodes x 1 task, time 8 min <= 10: submitit counts it as a
    timeout), ``job._interrupt(timeout=True)``;
and, while ``sig`` holds its run directory, a second job on the same run dir that must be refused;
``slurm/finetune_vil_base_in1k_384.sh`` from ``ref`` (``--dependency=afterok``); ``launch.submit --local``.
Every run has the same config and world size 2 (OMP_NUM_THREADS=1), so every interrupted run's losses
must equal the reference's, step for step.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurm_cluster import TERMINAL_STATES, slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
STEPS, K = 24, 3  # optimizer steps per run; signal once K steps are logged
SCRIPT = "slurm/pretrain_vil_base_in21k.sh"
CONFIG = "pretrain/configs/vil_base_in21k.yaml"


def tiny_overrides(data: Path) -> list[str]:
    return [f"data.train={data}#train", "data.eval=", "data.workers=1", "model.name=vil_tiny_rpb_224",
            "model.img_size=32", f"train.max_steps={STEPS}", "train.micro_batch=4", "aug.randaug=",
            "aug.mixup=0", "aug.cutmix=0", "aug.reprob=0", "sched.warmup_epochs=0", "precision=fp32",
            "deepspeed.zero_stage=1", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
            "log.every_steps=4"]


SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
              "--signal=USR1@60"]


@dataclass
class Run:
    name: str
    run_dir: Path
    job_id: str = ""
    log: Path | None = None  # the rank-0 / batch stderr
    interrupt: str | None = None  # usr1 | preempt | timeout
    signalled: bool = False
    problems: list = field(default_factory=list)

    def losses(self) -> dict[int, float]:
        path = self.run_dir / "train_log.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return {r["step"]: r["loss"] for r in rows}

    def steps_logged(self) -> int:
        path = self.run_dir / "train_log.jsonl"
        try:
            return sum(1 for line in path.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            return 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    r = subprocess.run([sys.executable, "-m", "data.demo", "--out", str(out), "--classes", "4", "--per-class",
                        "24", "--size", "40", "--val-per-class", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _submit_cli(cluster, env, args) -> tuple[str, Path]:
    r = subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"launch.submit failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert {"job id", "log", "run dir"} <= fields.keys(), r.stdout
    return fields["job id"].strip(), Path(fields["log"].strip())


def _submitit_job(run: Run):
    import submitit

    return submitit.SlurmJob(folder=run.run_dir / "submitit", job_id=run.job_id, tasks=(0, 1))


@pytest.fixture(scope="module")
def runs(slurm_cluster, demo_data, tmp_path_factory):  # noqa: F811
    cluster = slurm_cluster
    base = tmp_path_factory.mktemp("runs")
    env = dict(cluster.env, RUNS_ROOT=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    over = tiny_overrides(demo_data)
    logs = ["--output", f"{base}/%x-%j.out", "--error", f"{base}/%x-%j.err"]
    out = {}
    t0 = time.time()
    for name, interrupt in (("ref", None), ("sig", "usr1")):
        run = Run(name, base / name, interrupt=interrupt)
        run.job_id = cluster.sbatch(SCRIPT, *over, options=["-J", name, *logs, *SBATCH_CPU], cwd=ROOT, env=env)
        run.log = base / f"{name}-{run.job_id}.err"
        out[name] = run
    for name, interrupt, shape in (("pre", "preempt", ["--nodes", "1", "--tasks-per-node", "2", "--time", "30"]),
                                   ("tmo", "timeout", ["--nodes", "2", "--tasks-per-node", "1", "--time", "8"])):
        run = Run(name, base / name, interrupt=interrupt)
        run.job_id, _ = _submit_cli(cluster, env, ["--config", CONFIG, *shape, "--gpus-per-node", "0",
                                                   "--cpus-per-task", "1", "--signal-delay-s", "30",
                                                   "--job-name", name, *over, f"run.dir={run.run_dir}"])
        run.log = run.run_dir / "submitit" / f"{run.job_id}_0_log.err"
        out[name] = run

    # Finetuning from ref's run once ref has finished (Slurm holds it until then).
    ft = Run("ft", base / "ft_explicit")  # run.dir= among the arguments wins over $RUNS_ROOT/$SLURM_JOB_NAME
    ft.job_id = cluster.sbatch("slurm/finetune_vil_base_in1k_384.sh", *over, "finetune.head=keep", "train.max_steps=4",
                               "train.global_batch=0",  # the recipe fixes 512; this CPU cluster runs 2 x micro 8
                               f"run.dir={ft.run_dir}",
                               options=["-J", "ft", *logs, *SBATCH_CPU, f"--dependency=afterok:{out['ref'].job_id}"],
                               cwd=ROOT, env=dict(env, PRETRAINED=str(out["ref"].run_dir)))
    ft.log = base / f"ft-{ft.job_id}.err"
    # submitit's local executor (no Slurm), 2 tasks, in the background.
    loc = Run("loc", base / "loc")
    local_env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    loc_proc = subprocess.Popen([sys.executable, "-m", "launch.submit", "--config", CONFIG, "--local",
                                 "--tasks-per-node", "2", "--time", "20", "--wait", *over, f"run.dir={loc.run_dir}"],
                                cwd=ROOT, env=local_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # A second job on sig's run dir (same job name -> same default run dir) while sig holds it.
    lock = Run("lock", base / "sig")
    lock2 = Run("lock2", base / "pre")  # the same through launch.submit, while pre holds its run dir
    deadline = time.time() + 420
    while time.time() < deadline:
        pending = [r for r in out.values() if r.interrupt and not r.signalled and not r.problems]
        if not pending and lock.job_id and lock2.job_id:
            break
        if not lock2.job_id and out["pre"].steps_logged() >= 1 and not out["pre"].signalled:
            lock2.job_id, _ = _submit_cli(cluster, env, ["--config", CONFIG, "--nodes", "1", "--tasks-per-node", "2",
                                                         "--cpus-per-task", "1", "--time", "10", "--job-name", "lock2",
                                                         *over, f"run.dir={lock2.run_dir}"])
        if not lock.job_id and out["sig"].steps_logged() >= 1 and not out["sig"].signalled:
            lock.job_id = cluster.sbatch(SCRIPT, *over, options=["-J", "sig", *logs, *SBATCH_CPU[2:],
                                                                 "--nodes=1", "--ntasks-per-node=1"],
                                         cwd=ROOT, env=env)
            lock.log = base / f"sig-{lock.job_id}.err"
        for run in pending:
            state = cluster.job_state(run.job_id)
            if state in TERMINAL_STATES:
                run.problems.append(f"job {run.job_id} ended ({state}) before step {K}:\n{run.log_text()[-3000:]}")
            elif run.steps_logged() >= K:
                if run.interrupt == "usr1":
                    cluster.run(["scancel", "--signal=USR1", "--full", run.job_id])
                else:
                    _submitit_job(run)._interrupt(timeout=run.interrupt == "timeout")
                run.signalled = True
                print(f"{run.name}: signalled ({run.interrupt}) at {run.steps_logged()} steps, "
                      f"{time.time() - t0:.0f} s", flush=True)
        time.sleep(0.3)
    for run in out.values():
        if run.interrupt and not run.signalled and not run.problems:
            run.problems.append(f"never reached step {K} within the deadline:\n{run.log_text()[-3000:]}")
    out["lock"] = lock
    out["lock2"] = lock2
    out["ft"] = ft
    out["loc"] = loc
    out["_loc_proc"] = loc_proc
    out["_cluster"] = cluster
    try:
        yield out
    finally:
        if loc_proc.poll() is None:
            loc_proc.kill()
            loc_proc.wait()


def _wait_done(cluster, run: Run, timeout: float = 360) -> dict:
    assert not run.problems, "\n".join(run.problems)
    state = cluster.wait_job(run.job_id, timeout=timeout)
    info = cluster.job_info(run.job_id)
    assert state == "COMPLETED", f"{run.name}: job {run.job_id} {state} {info}\n{run.log_text()[-4000:]}"
    return info


def _assert_same_losses(run: Run, ref: Run):
    got, want = run.losses(), ref.losses()
    assert sorted(want) == list(range(1, STEPS + 1)), f"reference logged steps {sorted(want)}"
    assert sorted(got) == list(range(1, STEPS + 1)), f"{run.name} logged steps {sorted(got)}"
    diff = {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    assert not diff, f"{run.name}: losses differ from the uninterrupted run at steps {sorted(diff)}: {diff}"


def test_sbatch_script_trains_checkpoints_and_exits_cleanly(runs):
    cluster, ref = runs["_cluster"], runs["ref"]
    info = _wait_done(cluster, ref)
    assert info["ExitCode"] == "0:0" and info.get("Restarts", "0") == "0", info
    assert info["NumNodes"] == "2" and info["JobName"] == "ref"
    assert sorted(ref.losses()) == list(range(1, STEPS + 1))
    ckpts = ref.run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (ckpts / f"step_{STEPS:08d}").is_dir()
    assert (ref.run_dir / "config.yaml").is_file() and any((ref.run_dir / "tb").iterdir())
    assert not (ref.run_dir / ".slurm-job.lock").exists(), "the run-dir lock must be released at the end"
    text = ref.log_text()
    assert "restart 0 on node[1-2]" in text and "training step exited with 0" in text, text[-3000:]


def test_sbatch_usr1_checkpoints_requeues_and_resumes_exactly(runs):
    cluster, sig, ref = runs["_cluster"], runs["sig"], runs["ref"]
    info = _wait_done(cluster, sig)
    text = sig.log_text()
    assert info["ExitCode"] == "0:0" and int(info.get("Restarts", 0)) >= 1, info
    assert "training step exited with 85" in text and f"requeued job {sig.job_id} (it resumes" in text, text[-4000:]
    assert "restart 1 on" in text and "resumed from" in text, text[-4000:]
    stopped = [line for line in text.splitlines() if "stopped on request at step" in line]
    assert stopped, text[-4000:]
    _wait_done(cluster, ref)
    _assert_same_losses(sig, ref)


def test_second_job_on_a_live_run_dir_is_refused(runs):
    cluster, lock = runs["_cluster"], runs["lock"]
    assert lock.job_id, "the lock probe was never submitted"
    state = cluster.wait_job(lock.job_id, timeout=120)
    info = cluster.job_info(lock.job_id)
    assert state == "FAILED" and info["ExitCode"] == "3:0", (state, info, lock.log_text()[-3000:])
    assert f"in use by live Slurm job {runs['sig'].job_id}" in lock.log_text(), lock.log_text()[-3000:]


def test_submitit_job_on_a_live_run_dir_is_refused(runs):
    cluster, lock2 = runs["_cluster"], runs["lock2"]
    assert lock2.job_id, "the submitit lock probe was never submitted"
    job = _submitit_job(lock2)
    cluster.wait_job(lock2.job_id, timeout=120)
    for task in (0, 1):  # every rank refuses (none is left waiting for a rank 0 that gave up)
        with pytest.raises(Exception, match=f"in use by live Slurm job {runs['pre'].job_id}"):
            job.task(task).result()


def _check_submitit_run(runs, name: str, case: str):
    cluster, run, ref = runs["_cluster"], runs[name], runs["ref"]
    assert not run.problems, "\n".join(run.problems)
    job = _submitit_job(run)
    deadline = time.time() + 360
    while not job.done() and time.time() < deadline:  # result files; no sacct without slurmdbd
        state = cluster.job_state(run.job_id)
        assert state not in TERMINAL_STATES - {"COMPLETED"}, f"{name}: {state}\n{run.log_text()[-4000:]}"
        time.sleep(1)
    results = job.results()
    assert [r["rank"] for r in results] == [0, 1] and all(r["exit_code"] == 0 for r in results), results
    state = cluster.wait_job(run.job_id, timeout=60)  # the batch script ends just after the tasks
    info = cluster.job_info(run.job_id)
    assert state == "COMPLETED" and int(info.get("Restarts", 0)) >= 1, info
    text = run.log_text()
    assert f"this job is {case}" in text and f"Requeued job {run.job_id}" in text, text[-4000:]
    assert "stopped on request at step" in text and "resumed from" in text, text[-4000:]
    _wait_done(cluster, ref)
    _assert_same_losses(run, ref)
    assert not (run.run_dir / ".slurm-job.lock").exists()


def test_submitit_preemption_requeues_and_resumes_exactly(runs):
    _check_submitit_run(runs, "pre", "preempted")


def test_submitit_timeout_requeues_and_resumes_exactly(runs):
    _check_submitit_run(runs, "tmo", "timed-out")


def test_submit_rejects_a_bad_config_before_submitting(slurm_cluster, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "launch.submit", "--config", CONFIG, "--nodes", "1",
                        "--tasks-per-node", "1", "train.no_such_key=1", f"run.dir={tmp_path / 'bad'}"],
                       cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no_such_key" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "bad").exists()


def test_run_dir_lock_takes_over_stale_locks(slurm_cluster, tmp_path):  # noqa: F811
    from launch.slurm import LOCK_NAME, RunDirLocked, acquire, release, run_dir_from_overrides

    assert run_dir_from_overrides("/r/default", ["a=1", "run.dir=/x", "run.dir=/y"]) == "/y"
    assert run_dir_from_overrides("/r/default", ["a=1"]) == "/r/default"
    # (ids 9000xx stand for jobs of our own; no real job of this session gets them)
    (tmp_path / LOCK_NAME).write_text("job=999999 host=h since=t\n")  # a job slurmctld does not know: stale
    acquire(tmp_path, "900007")
    assert "job=900007" in (tmp_path / LOCK_NAME).read_text()
    acquire(tmp_path, "900007")  # a requeued run of the same job takes its own lock back
    # a live job holds it: sleep in a real job, then try to take the lock from another id
    jid = slurm_cluster.sbatch("--wrap=sleep 60", options=["-J", "holder", f"--output={tmp_path}/h.out"], cwd=tmp_path)
    try:
        slurm_cluster.wait_job(jid, timeout=60, states={"RUNNING"})
        (tmp_path / LOCK_NAME).write_text(f"job={jid} host=h since=t\n")
        with pytest.raises(RunDirLocked, match=f"live Slurm job {jid}"):
            acquire(tmp_path, "900008")
    finally:
        slurm_cluster.run(["scancel", jid], check=False)
    slurm_cluster.wait_job(jid, timeout=60)
    acquire(tmp_path, "900008")  # cancelled: stale now
    assert not release(tmp_path, "900009") and release(tmp_path, "900008") and not (tmp_path / LOCK_NAME).exists()


def test_finetune_script_starts_from_the_pretraining_run(runs):
    cluster, ft, ref = runs["_cluster"], runs["ft"], runs["ref"]
    info = _wait_done(cluster, ft)
    assert info["ExitCode"] == "0:0", info
    text = ft.log_text()
    assert f"finetune init from {ref.run_dir}" in text and "-m finetune --config finetune/configs/" in text, text[-4000:]
    assert sorted(ft.losses()) == [1, 2, 3, 4]
    assert (ft.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (ft.run_dir.parent / "ft").exists(), "run.dir= must win over the default run dir"


def test_submit_local_executor_trains_like_slurm(runs):
    proc, loc, ref = runs["_loc_proc"], runs["loc"], runs["ref"]
    try:
        output, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"launch.submit --local did not finish:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert "results: [{'rank': 0, 'exit_code': 0" in output and "'rank': 1" in output, output[-2000:]
    _wait_done(runs["_cluster"], ref)
    _assert_same_losses(loc, ref)


def test_generic_script_picks_the_entry_from_the_recipe_and_reports_config_errors(slurm_cluster, tmp_path):  # noqa: F811
    env = dict(slurm_cluster.env, RUNS_ROOT=str(tmp_path))
    logs = ["--output", f"{tmp_path}/%x-%j.out", "--error", f"{tmp_path}/%x-%j.err", *SBATCH_CPU]
    jobs = {
        "usage": slurm_cluster.sbatch("slurm/train.sh", "a.b=1", options=["-J", "usage", *logs], cwd=ROOT, env=env),
        "pre": slurm_cluster.sbatch("slurm/train.sh", "pretrain/configs/demo.yaml", "train.no_such_key=1",
                                    options=["-J", "pre", *logs], cwd=ROOT, env=env),
        # only the finetune entry checks finetune.init (pretrain would accept the key): proves the entry choice
        "fin": slurm_cluster.sbatch("slurm/train.sh", "finetune/configs/demo_finetune.yaml",
                                    f"finetune.init={tmp_path}/no_such_checkpoint",
                                    options=["-J", "fin", *logs], cwd=ROOT, env=env),
    }
    expect = {"usage": "usage: sbatch -J NAME slurm/train.sh RECIPE.yaml", "pre": "no_such_key",
              "fin": "config key 'finetune.init'"}
    for name, jid in jobs.items():
        state = slurm_cluster.wait_job(jid, timeout=120)
        info = slurm_cluster.job_info(jid)
        err = (tmp_path / f"{name}-{jid}.err").read_text()
        assert state == "FAILED" and info["ExitCode"] == "2:0", (name, info, err)
        assert expect[name] in err, (name, err)
        assert not (tmp_path / name / ".slurm-job.lock").exists()  # refused before taking the run dir
