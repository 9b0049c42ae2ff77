import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# In-process compute uses 2 threads (the CI machine's 2 cores); under 2 or more xdist workers
# (scripts/test.sh) each worker takes one, or the workers' thread pools fight over the cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The order in which scripts/test.sh's 2 workers take the modules (``--dist loadfile
# --no-loadscope-reorder``: one module per worker at a time, in collection order): the longest first, so
# that neither worker is left running one long module alone at the end. Measured per module on a 2-core
# Xeon held to AVX2 kernels, serial run: test_engine 92 s, test_slurm 76 s, test_models_common 52 s,
# test_slurm_elastic 46 s, test_chaos 36 s, test_elastic 29 s, test_gpu_check 28 s, test_release_export
# 28 s, test_learning 26 s, test_data_loader 22 s; everything else under 21 s.
LONGEST_FIRST = ["test_engine", "test_slurm", "test_models_common", "test_slurm_elastic", "test_chaos",
                 "test_elastic", "test_gpu_check", "test_release_export", "test_learning", "test_data_loader"]


def pytest_collection_modifyitems(config, items):
    """On xdist workers only: the longest modules first (a stable sort: the order inside a module and
    among the rest is kept). A plain ``pytest`` run keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item):
        return LONGEST_FIRST.index(item.path.stem) if item.path.stem in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter, config):
    """Name the CPU next to the suite's time: suite timings are only comparable with the machine named."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import torch

    from pretrain.precision import cpu_model, native_bf16

    native, why = native_bf16(torch.device("cpu"))
    workers = getattr(config.option, "numprocesses", None) or 0
    terminalreporter.write_line(f"suite CPU: {cpu_model()}, {os.cpu_count()} cores; bf16 "
                                f"{'native' if native else 'emulated'} ({why}); xdist workers: {workers}")


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """Give the next test the thread count this one started with. A CLI entry run in-process
    (``models.bench.main`` sets its ``--threads``, 2 by default) would otherwise leave a worker at 2 threads
    beside the other worker: every later in-process test on it then runs with more threads than its core,
    and OpenMP's waits at the end of each parallel region cost 4-5x on ops with many small regions (the
    MS-MLP golden checks: 10k depthwise convolutions in float64)."""
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        if threads is None:  # the test imported torch: its default comes from OMP_NUM_THREADS, set above
            threads = int(os.environ["OMP_NUM_THREADS"])
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def isolated_index_cache(tmp_path_factory):
    """The data index cache inside pytest's temp dir for one module (subprocesses inherit the variable)."""
    old = os.environ.get("HVP_DATA_CACHE")
    os.environ["HVP_DATA_CACHE"] = str(tmp_path_factory.mktemp("idxcache"))
    yield
    if old is None:
        os.environ.pop("HVP_DATA_CACHE", None)
    else:
        os.environ["HVP_DATA_CACHE"] = old
