"""The engine tests' ranks are forked from pre-imported interpreters (tests/rank_zygote.py): such a rank
must start, run and end exactly as a fresh ``python -m`` process does, or the engine tests would prove less."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from engine_utils import ForkedRank, Ranks, forkable

PROBE = "tests.fixtures.zygote_probe"


def _probe(tmp_path, mode, fresh, monkeypatch, expect):
    monkeypatch.setenv("HVP_TEST_FRESH_RANKS", "1" if fresh else "0")
    out = tmp_path / "probe.json"  # the same argv for both kinds of launch
    ranks = Ranks([mode, str(out)], module=PROBE, log_dir=tmp_path, env={"HVP_FAULT_NAN_STEPS": "7"})
    assert all(isinstance(p, ForkedRank) != fresh for p in ranks.procs)
    outs = [out.with_name(f"{out.name}.{r}") for r in range(2)]
    if mode == "hang":
        deadline = time.time() + 60
        while not all(o.exists() for o in outs) and time.time() < deadline:
            time.sleep(0.05)
        ranks.signal(signal.SIGKILL)
    codes = ranks.wait(60)
    assert codes == [expect, expect], ranks.output(0)
    seen = [json.loads(o.read_text()) for o in outs]
    for o in outs:
        o.unlink()
    for p, f in zip(ranks.procs, seen):  # the launch's own keys; the rest must match between the kinds
        for key in ("MASTER_PORT", "HVP_TEST_FRESH_RANKS"):
            f["env"].pop(key)
        f["import_env"] = p.zygote.import_env if isinstance(p, ForkedRank) else {}
    return seen, [ranks.output(r) for r in range(2)]


@pytest.mark.parametrize("mode,expect", [("ok", 0), ("exit3", 3), ("raise", 1), ("hang", -signal.SIGKILL)])
def test_forked_rank_starts_and_ends_like_a_fresh_process(tmp_path, monkeypatch, mode, expect):
    forked, forked_logs = _probe(tmp_path, mode, False, monkeypatch, expect)
    fresh, fresh_logs = _probe(tmp_path, mode, True, monkeypatch, expect)
    for a, b in zip(forked, fresh):
        assert {k: v for k, v in a.items() if k not in ("hash", "env", "import_env")} == \
            {k: v for k, v in b.items() if k not in ("hash", "env", "import_env")}
        # A forked rank has what importing the stack puts in the environment (DS_ACCELERATOR=cpu ...), as a
        # fresh rank has once it has imported (the probe itself imports nothing). The zygote's imports set it
        # unless this test process had imported the stack before starting the zygote and passed it on.
        assert a["env"].get("DS_ACCELERATOR") == "cpu"
        assert a["env"] == {**a["import_env"], **b["env"]}
    assert forked[0]["name"] == "__main__" == forked[0]["main"] and forked[0]["fault"] == "7"
    assert [f["rank"] for f in forked] == ["0", "1"]
    # Separate interpreters: the two ranks of a job do not share a string hash seed (they would if both
    # were forked from one zygote), so code whose behaviour follows set order is not hidden from the tests.
    assert forked[0]["hash"] != forked[1]["hash"] and fresh[0]["hash"] != fresh[1]["hash"]
    for log in forked_logs + fresh_logs:
        assert f"probe {mode} rank" in log
        assert ("ValueError: probe failure" in log) == (mode == "raise")


def test_an_environment_read_at_import_starts_ranks_fresh(tmp_path, monkeypatch):
    """A variable the interpreter may read while importing (anything outside RUNTIME_ENV) cannot be given
    to a process that has already imported: such ranks start fresh."""
    monkeypatch.setenv("HVP_TEST_FRESH_RANKS", "0")
    ranks = Ranks(["ok", str(tmp_path / "o.json")], module=PROBE, log_dir=tmp_path,
                  rank_env={1: {"ATEN_CPU_CAPABILITY": "default"}})
    assert isinstance(ranks.procs[0], ForkedRank) and isinstance(ranks.procs[1], subprocess.Popen)
    assert ranks.wait(60) == [0, 0]


def test_forkable_allows_only_run_time_keys_and_values_the_imports_set():
    zygote = {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    imports = {"DS_ACCELERATOR": "cpu"}
    assert forkable({**zygote, "RANK": "1", "MASTER_PORT": "7", "HVP_DATA_CACHE": "/c"}, zygote, imports)
    assert forkable({**zygote, "DS_ACCELERATOR": "cpu"}, zygote, imports)
    assert not forkable({**zygote, "DS_ACCELERATOR": "cuda"}, zygote, imports)
    assert not forkable({**zygote, "OMP_NUM_THREADS": "2"}, zygote, imports)
    assert not forkable({"PATH": "/bin"}, zygote, imports)
