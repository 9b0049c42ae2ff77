"""scripts/gpu_check.py in its reduced CPU form: every part runs, says what it skipped, and the killed and
resumed training run finishes with the uninterrupted run's losses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine_utils import ROOT, clean_env, script_ranks_forked


def _gpu_check(tmp_path, *parts):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out), "--parts", *parts], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def test_cpu_form_data_and_training(tmp_path, monkeypatch, capsys):
    """The script's main in this process, its ranks forked from pre-imported interpreters (the all-parts
    test below runs the script as a subprocess)."""
    script_ranks_forked(monkeypatch)
    import gpu_check
    out = tmp_path / "report.json"
    code = gpu_check.main(["--out", str(out), "--parts", "data", "train"])
    assert code == 0, capsys.readouterr().out[-3000:]
    report = json.loads(out.read_text())
    assert report["form"] == "cpu-reduced" and "no CUDA" in report["device"]
    assert report["data"]["img_per_s"]["DALI CPU train (2 threads)"] > 0
    assert any("mixed" in s for s in report["data"]["skipped"])
    train = report["train"]
    assert train["losses_identical"] and train["exit_codes"] == [0, 0, 0, 0] and train["steps"] == 12
    assert train["skipped"]


@pytest.mark.slow
def test_cpu_form_all_parts(tmp_path):
    report = _gpu_check(tmp_path, "data", "models", "train")
    assert report["models"]["rows"] and report["models"]["skipped"]
