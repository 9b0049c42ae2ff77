"""scripts/chaos_resume.sh: SIGKILL at random moments (after steps, inside checkpoint writes, during
evaluation), restart, and the final per-step losses are bit-identical to an uninterrupted run."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine_utils import ROOT, clean_env, script_ranks_forked


def _chaos(kills: int, tmp_path, timeout: int) -> str:
    r = subprocess.run([sys.executable, "scripts/chaos_resume.py", str(kills), "--seed", "0",
                        "--workdir", str(tmp_path)], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return r.stdout


def test_chaos_three_kills(tmp_path, monkeypatch, capsys):
    """The script's main in this process, its ranks forked from pre-imported interpreters (the 20-kill
    test below runs the script as a subprocess)."""
    script_ranks_forked(monkeypatch)
    import chaos_resume
    code = chaos_resume.main(["3", "--seed", "0", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    kills = [line for line in out.splitlines() if line.startswith("kill ")]
    assert len(kills) == 3 and all("SIGKILL" in k for k in kills), out
    assert {k.split()[3] for k in kills} == {"step", "ckpt", "eval"}, out  # each kind hit once
    assert "per-step losses bit-identical" in out


@pytest.mark.slow
def test_chaos_twenty_kills(tmp_path):
    out = _chaos(20, tmp_path, timeout=3600)
    assert "per-step losses bit-identical" in out
