import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
