"""End to end through the real engine: a ZeRO-2 run at 64 px -> `python -m finetune` at 96 px (full-attention
tables resized by the engine's load_init_weights hook) -> `python -m finetune.export` of the finetune run."""
import json
import os
import subprocess
import sys
from pathlib import Path

from finetune_testlib import _free_port, make_ds_runs

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_then_export(tmp_path_factory, tmp_path):
    init = make_ds_runs(tmp_path_factory) / "run_s2"
    data = tmp_path / "data"
    from data.demo import make_demo
    make_demo(str(data), classes=10, per_class=4, size=64, val_per_class=1, workers=1, quiet=True)
    run = tmp_path / "ft"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "finetune", "--config", "finetune/configs/demo_finetune.yaml", f"init={init}",
           f"run.dir={run}", f"data.train={data}#train", "data.eval=", "model.img_size=96",
           "model.kwargs={depths: [1, 1, 1, 1]}", "train.max_steps=2", "train.micro_batch=4", "data.pipeline=torch",
           "data.workers=0", "checkpoint.every_steps=2", "eval.every_steps=0", "eval.every_epoch=false",
           "sched.warmup_steps=1", "log.every_steps=1", "log.image_grid=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    log = p.stdout + p.stderr
    assert "initialised from" in log and "local_relative_position_bias_table" in log
    assert (run / "checkpoints" / "latest").is_file()

    p = subprocess.run([sys.executable, "-m", "finetune.export", "--ckpt", str(run), "--format", "timm"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    cfg = json.loads((run / "exports" / "config.json").read_text())
    assert cfg["model_args"]["img_size"] == 96 and cfg["num_classes"] == 10
    assert cfg["pretrained_cfg"]["crop_pct"] == 0.922 and len(cfg["label_names"]) == 10
    rep = json.loads((run / "exports" / "export_report.json").read_text())
    assert rep["formats"]["timm"]["verified"] and rep["source_kind"] == "run"
