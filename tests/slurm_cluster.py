"""A real Slurm cluster on this one machine, for the cluster tests (and by hand).

Debian 12's Slurm 22.05 + munge, no systemd: the daemons are started by hand, as root, from a private
directory (munge key, slurm.conf, state, spool, logs, pid files) and stopped by their pid files.
Two "nodes" (``node1``, ``node2``) run on this host: ``NodeName=node[1-2] Port=[p1-p2]
NodeHostname=<hostname> NodeAddr=127.0.0.1``. Why the settings (each one was an error without it):
munged gets explicit key/socket/pid/log/seed files and a 0711 socket directory; slurm.conf has no empty
``Key=`` line (fatal), ``MailProg=/bin/true``, ``MpiDefault=none``, ``SlurmUser=SlurmdUser=root``; the
node topology is ``slurmd -C``'s and ``SlurmdParameters=config_overrides`` makes slurmd accept fake nodes;
``select/cons_tres`` with ``CR_Core_Memory`` needs ``DefMemPerCPU`` (else each job takes a node's whole
memory and jobs run one at a time); ``proctrack/linuxproc`` and ``task/none`` need no cgroups; each node's
``SlurmdSpoolDir`` (``%n``) exists before slurmd starts; ``cred_expire`` and
``SchedulerParameters=sched_interval=2,bf_interval=1`` let a requeued job run again after ~11 s instead
of ~120 s in ``PENDING (BeginTime)``.

Use from pytest (session-scoped; installs the Debian packages when missing)::

    from slurm_cluster import slurm_cluster          # noqa: F401  (fixture)

    def test_x(slurm_cluster):
        jid = slurm_cluster.sbatch("slurm/train.sh", "a.b=1", options=["--nodes=2"])
        assert slurm_cluster.wait_job(jid, timeout=120) == "COMPLETED"

By hand (leaves the daemons running until ``down``)::

    python tests/slurm_cluster.py up /tmp/slurm     # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    python tests/slurm_cluster.py down /tmp/slurm

Skips (pytest) only when the packages cannot be installed and ``CI`` is not ``true``; in CI it fails.
The pytest fixture declares 6 CPUs per node (``HVP_TEST_SLURM_CPUS``; ``SlurmdParameters=config_overrides``
allows more than the host has) so the cluster tests' small jobs run at once instead of queueing.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "UNKNOWN"}


class SlurmUnavailable(RuntimeError):
    """The Slurm/munge packages are missing and could not be installed."""


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(log=print) -> None:
    """Install Debian's slurmctld/slurmd/slurm-client/munge with apt when any binary is missing."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {_missing_binaries()} and cannot apt-get install them (need root + apt)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(PACKAGES)} with apt-get")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    if _missing_binaries():
        raise SlurmUnavailable(f"still missing after install: {_missing_binaries()}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port_block(n: int, lo: int = 17000, hi: int = 19000) -> int:
    """First port of ``n`` consecutive free ports (randomised start so parallel clusters do not collide)."""
    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rng.randrange(lo, hi - n)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block for slurmctld/slurmd")


def _node_topology() -> dict:
    """CPUs/Sockets/CoresPerSocket/ThreadsPerCore/RealMemory as ``slurmd -C`` reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    topo = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
    cpus = int(topo.get("CPUs", os.cpu_count() or 1))
    return {"CPUs": cpus,
            "Sockets": int(topo.get("SocketsPerBoard", topo.get("Sockets", 1))),
            "CoresPerSocket": int(topo.get("CoresPerSocket", cpus)),
            "ThreadsPerCore": int(topo.get("ThreadsPerCore", 1)),
            "RealMemory": int(topo.get("RealMemory", 4096))}


class SlurmCluster:
    """Files and daemons of one local cluster under ``root``; ``env`` is what clients need."""

    def __init__(self, root: str | os.PathLike, nodes: int = 2, cred_expire: int = 10,
                 def_mem_per_cpu: int = 1024, cpus_per_node: int | None = None, first_job_id: int = 1):
        self.root = Path(root).resolve()
        # Job ids give a job's rendezvous port (launch.distributed.port_from_job_id: 20000 + id), so
        # clusters running side by side on one host (one per pytest-xdist worker) start their ids apart.
        self.first_job_id = first_job_id
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cred_expire = cred_expire
        self.def_mem_per_cpu = def_mem_per_cpu
        # None: the host's CPUs (slurmd -C). More declares an overcommitted node (allowed by
        # SlurmdParameters=config_overrides) so several small test jobs run at once.
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        # munged wants execute permission for all on every directory above its socket (pytest's tmp dirs
        # are 0700): the socket lives in a short 0711 directory under /tmp, recorded in root/munge-socket-dir.
        self._socket_dir_file = self.root / "munge-socket-dir"
        self.munge_socket_dir = (Path(self._socket_dir_file.read_text().strip())
                                 if self._socket_dir_file.exists() else None)
        self.munge_socket = self.munge_socket_dir / "munge.socket.2" if self.munge_socket_dir else None
        self.munge_pid = self.root / "munged.pid"
        self.ctld_pid = self.root / "slurmctld.pid"
        self.logs = self.root / "log"
        # What jobs inherit (sbatch exports the submitter's environment): never a rendezvous of this process.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        self.env["SLURM_CONF"] = str(self.conf)
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # running the tests inside a Slurm job must not leak that job's values
                del self.env[var]
        self.started: list[Path] = []  # pid files of the daemons this object started

    # ----------------------------------------------------------------------------------------- setup
    def slurmd_pid(self, node: str) -> Path:
        return self.root / f"slurmd-{node}.pid"

    def write_config(self) -> None:
        for d in (self.root, self.munge_dir, self.logs, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.munge_dir, 0o700)
        if self.munge_socket_dir is None:
            self.munge_socket_dir = Path(tempfile.mkdtemp(prefix="hvp-munge-", dir="/tmp"))
            self._socket_dir_file.write_text(f"{self.munge_socket_dir}\n")
            self.munge_socket = self.munge_socket_dir / "munge.socket.2"
        os.chmod(self.munge_socket_dir, 0o711)  # munged refuses a socket directory others can write to
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        topo = _node_topology()
        if self.cpus_per_node and self.cpus_per_node != topo["CPUs"]:
            topo.update(CPUs=self.cpus_per_node, Sockets=1, CoresPerSocket=self.cpus_per_node, ThreadsPerCore=1)
        port = _free_port_block(1 + len(self.nodes))
        host = socket.gethostname()
        n = len(self.nodes)
        node_ports = f"[{port + 1}-{port + n}]" if n > 1 else str(port + 1)
        node_names = f"node[1-{n}]" if n > 1 else "node1"
        r = self.root
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py
ClusterName=hvptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
FirstJobId={self.first_job_id}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={self.def_mem_per_cpu}
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={self.ctld_pid}
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
NodeName={node_names} Port={node_ports} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={topo['CPUs']} Sockets={topo['Sockets']} CoresPerSocket={topo['CoresPerSocket']} ThreadsPerCore={topo['ThreadsPerCore']} RealMemory={topo['RealMemory']} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _run_daemon(self, cmd: list[str], pid_file: Path, what: str) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed to start ({r.returncode}): {r.stdout}{r.stderr}")
        self.started.append(pid_file)
        deadline = time.time() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.time() > deadline:
                raise RuntimeError(f"{what}: no pid file {pid_file} after 20 s; see {self.logs}")
            time.sleep(0.1)

    def start(self, timeout: float = 90) -> "SlurmCluster":
        self.write_config()
        self._run_daemon(["munged", f"--key-file={self.munge_dir / 'munge.key'}", f"--socket={self.munge_socket}",
                          f"--pid-file={self.munge_pid}", f"--log-file={self.logs / 'munged.log'}",
                          f"--seed-file={self.munge_dir / 'munged.seed'}"], self.munge_pid, "munged")
        self._run_daemon(["slurmctld", "-f", str(self.conf)], self.ctld_pid, "slurmctld")
        for node in self.nodes:
            self._run_daemon(["slurmd", "-f", str(self.conf), "-N", node], self.slurmd_pid(node), f"slurmd {node}")
        self.wait_idle(timeout)
        return self

    def wait_idle(self, timeout: float = 90) -> None:
        deadline, out = time.time() + timeout, ""
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            out = r.stdout
            states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout} s: {out!r}; logs in {self.logs}")

    # ------------------------------------------------------------------------------------- teardown
    def stop(self, timeout: float = 20) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (by pid file), all at once."""
        if self.ctld_pid in self.started:
            ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False)
                deadline = time.time() + timeout
                while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                    time.sleep(0.5)
        _kill_pid_files(list(reversed(self.started)), timeout)
        if self.munge_pid in self.started and self.munge_socket_dir is not None:
            shutil.rmtree(self.munge_socket_dir, ignore_errors=True)
        self.started.clear()

    # -------------------------------------------------------------------------------------- clients
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=kw.pop("timeout", 60), **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} -> {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def sbatch(self, script: str | os.PathLike, *args: str, options: list[str] = (), cwd=None,
               env: dict | None = None) -> str:
        """``sbatch --parsable [options] script args...`` from ``cwd``; returns the job id."""
        e = dict(self.env, **(env or {}))
        r = self.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd, env=e)
        return r.stdout.strip().split(";")[0]

    def job_info(self, jobid: str) -> dict:
        """``scontrol show job -o`` as a dict ({} when slurmctld no longer knows the job)."""
        r = self.run(["scontrol", "show", "job", "-o", str(jobid)], check=False)
        if r.returncode != 0 or "JobId=" not in r.stdout:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout.splitlines()[0]))

    def job_state(self, jobid: str) -> str:
        return self.job_info(jobid).get("JobState", "UNKNOWN")

    def wait_job(self, jobid: str, timeout: float = 120, states=TERMINAL_STATES, poll: float = 1.0) -> str:
        """Wait until the job reaches one of ``states`` (default: finished); returns the state."""
        deadline, state = time.time() + timeout, "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(jobid)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {jobid} still {state} after {timeout} s: {self.job_info(jobid)}")

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5, jobid: str | None = None):
        """Poll ``predicate()`` until truthy; fail early if ``jobid`` finishes meanwhile."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            if jobid is not None:
                state = self.job_state(jobid)
                if state in TERMINAL_STATES:
                    raise AssertionError(f"job {jobid} ended ({state}) before: {what}")
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout} s waiting for: {what}")


def _kill_pid_files(pid_files: list[Path], timeout: float) -> None:
    """SIGTERM every daemon at once, then wait for all (each takes up to ~2 s to exit; one after the other
    added ~7 s to every session's teardown); SIGKILL what is still alive after ``timeout``."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, IndexError):  # no pid file, or the process is gone
            continue
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def start_cluster(root, **kw) -> SlurmCluster:
    ensure_installed()
    cluster = SlurmCluster(root, **kw)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


# ------------------------------------------------------------------------------------------ pytest
try:
    import pytest
except ImportError:  # the module is also a command-line tool
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory):
        """A running 2-node cluster for the whole session; stopped by pid at the end."""
        try:
            ensure_installed()
        except SlurmUnavailable as e:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"Slurm cluster tests need the slurm/munge packages (CI=true, not skipping): {e}")
            pytest.skip(f"Slurm/munge packages unavailable and not installable here: {e}")
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)  # one cluster per xdist worker
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"),
                               cpus_per_node=int(os.environ.get("HVP_TEST_SLURM_CPUS", "6")),
                               first_job_id=1 + 1000 * worker)
        old_conf = os.environ.get("SLURM_CONF")
        try:
            cluster.start()
            os.environ["SLURM_CONF"] = str(cluster.conf)  # for clients that read os.environ (submitit)
            yield cluster
        finally:
            cluster.stop()
            if old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old_conf


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__)
        return 2
    cmd, root = argv
    if cmd == "up":
        c = start_cluster(root)
        print(f"export SLURM_CONF={c.conf}")
        return 0
    c = SlurmCluster(root)
    c.started = [c.munge_pid, c.ctld_pid] + [c.slurmd_pid(n) for n in c.nodes]
    if c.conf.exists():
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
