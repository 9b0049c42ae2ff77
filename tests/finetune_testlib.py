"""Shared helpers for the finetune / export tests: tiny models and real DeepSpeed checkpoints.

The DeepSpeed checkpoints are written by a subprocess (single process, gloo, world size 1) so that the
test process never holds a process group; one subprocess writes every ZeRO stage, once per session.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# tiny settings per family: (224 name, 384 name, constructor overrides)
TINY = {
    "vil": ("vil_tiny_rpb_224", "vil_tiny_rpb_384", dict(depths=(1, 1, 1, 1))),
    "vil_ape": ("vil_tiny_ape_224", "vil_tiny_ape_384", dict(depths=(1, 1, 1, 1))),
    "msg": ("msg_transformer_tiny_224", "msg_transformer_tiny_384", dict(depths=(1, 1, 1, 1))),
    "scalable_vit": ("scalable_vit_small_224", "scalable_vit_small_384", dict(depths=(1, 1, 1, 1))),
    "restv2": ("restv2_tiny_224", "restv2_tiny_384", dict(depths=(1, 1, 1, 1))),
    "ms_mlp": ("ms_mlp_tiny_224", "ms_mlp_tiny_384", dict(depths=(1, 1, 1, 1))),
}

DS_MODEL = "vil_tiny_rpb_224"
DS_KWARGS = dict(depths=(1, 1, 1, 1), img_size=64, num_classes=10)
# stage -> precision of the DeepSpeed checkpoints written by make_ds_runs
DS_STAGES = {0: "fp32", 1: "bf16", 2: "fp32", 3: "bf16"}

_SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch, timm, yaml, deepspeed
    import models
    from safetensors.torch import save_file
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    # a 1-process gloo job needs no shared-memory all-reduce: skip DeepSpeed's JIT build of that op
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    for stage, prec in spec["stages"].items():
        torch.manual_seed(int(stage))
        model = timm.create_model(spec["model"], **spec["kwargs"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": int(stage)}, "bf16": {"enabled": prec == "bf16"},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        x = torch.randn(2, 3, spec["kwargs"]["img_size"], spec["kwargs"]["img_size"])
        if prec == "bf16":
            x = x.bfloat16()
        loss = engine(x).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        run = os.path.join(out, f"run_s{stage}")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.yaml"), "w") as f:
            yaml.safe_dump({"model": {"name": spec["model"], "img_size": spec["kwargs"]["img_size"],
                            "num_classes": spec["kwargs"]["num_classes"],
                            "kwargs": {"depths": list(spec["kwargs"]["depths"])}}}, f)
        engine.save_checkpoint(os.path.join(run, "checkpoints"), tag="global_step1")
        # reference: the module's weights as the engine holds them (gathered under ZeRO-3)
        if int(stage) == 3:
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                ref = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        else:
            ref = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        save_file(ref, os.path.join(run, "reference.safetensors"))
        # the engine's EMA file (simulated: the reference scaled, so it differs from the raw weights)
        ema = {k: (v * 0.5 if v.is_floating_point() else v).contiguous() for k, v in ref.items()}
        save_file(ema, os.path.join(run, "checkpoints", "global_step1", "ema.safetensors"))
        engine.destroy()
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    print("DS-OK")
''')

_CACHE: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ds_runs(tmp_path_factory, stages=tuple(DS_STAGES)) -> Path:
    """Folder with ``run_s{stage}/`` run directories (config.yaml, checkpoints/ with latest + global_step1,
    reference.safetensors, ema.safetensors in the tag); built once per session."""
    if "runs" in _CACHE:
        return _CACHE["runs"]
    out = tmp_path_factory.mktemp("ds_runs")
    script = out / "make_ds.py"
    script.write_text(_SCRIPT)
    spec = {"model": DS_MODEL, "kwargs": DS_KWARGS, "stages": {str(s): DS_STAGES[s] for s in stages}}
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), str(out), json.dumps(spec)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or "DS-OK" not in proc.stdout:
        raise RuntimeError(f"DeepSpeed checkpoint script failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    _CACHE["runs"] = out
    return out


def tiny(name: str, **kwargs):
    import timm
    import models  # noqa: F401
    return timm.create_model(name, **kwargs).eval()
