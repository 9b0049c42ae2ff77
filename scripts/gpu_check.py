"""One check of what only a GPU shows, written as a JSON report (``$GPU_CHECK_OUT``, default
``runs/gpu_check.json``); on a machine without CUDA a reduced CPU form runs and says what it skipped.

    python scripts/gpu_check.py [--out FILE]        (bash scripts/gpu_check.sh installs first)

CUDA (about 8 minutes on one H100/H200):
  data     DALI "mixed" decode + random-resized-crop img/s next to the CPU pipelines (python -m data.bench)
  models   bf16 fwd+bwd img/s and MFU, eager vs torch.compile, for ViL-S, ViL-B and one variant of each
           other family, and ViL's flex vs default attention (python -m models.bench --suite)
  train    60 steps of ViL-S at 224 (DALI mixed, ZeRO-2, bf16, compile) with a checkpoint at step 30,
           SIGKILLed after step 33, resumed, finished; its losses must equal an uninterrupted run's
CPU (reduced): DALI CPU pipelines, the suite in fp32 at 64 px without compile, a 12-step ViL-Tiny run at 64
px (torch pipeline, ZeRO-2, precision auto, no compile) killed after step 8 and resumed.
Exit 0 when every part ran and the resumed losses are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_resume import ROOT, run_until, start_ranks, step_losses  # noqa: E402

CUDA = torch.cuda.is_available()


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr[-3000:], round(time.time() - t0, 1)


def check_data(work: Path) -> dict:
    shards = work / "shards"
    rc, out, _ = _run(["-m", "data.bench", "--make-data", str(shards), "--num", "2048" if CUDA else "256"], 600)
    if rc:
        return {"ok": False, "error": out[-2000:]}
    rc, out, secs = _run(["-m", "data.bench", "--shards", str(shards), "--batch", "128" if CUDA else "32",
                          "--size", "224", "--randaug", "", "--workers", str(min(os.cpu_count() or 2, 16))], 900)
    rates = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(.+?)\s+([\d.]+) img/s$", out, re.M)}
    return {"ok": rc == 0 and bool(rates), "img_per_s": rates, "seconds": secs,
            "skipped": [] if CUDA else ["DALI mixed (GPU) decoder: no CUDA device"]}


def check_models(work: Path) -> dict:
    out_json = work / "suite.json"
    cmd = ["-m", "models.bench", "--suite", "--json", str(out_json)]
    cmd += ["--dtype", "bf16", "--batch", "64", "--reps", "5"] if CUDA else \
        ["--dtype", "fp32", "--batch", "2", "--size", "64", "--reps", "1", "--no-flex",
         "--models", "vil_tiny_rpb_224", "restv2_tiny_224"]
    if not CUDA:
        cmd += ["--backend", "aot_eager"]  # the compiled path without minutes of C++ code generation on CPU
    rc, out, secs = _run(cmd, 1800)
    rows = json.loads(out_json.read_text()) if out_json.is_file() else None
    return {"ok": rc == 0 and rows is not None, "rows": rows, "seconds": secs, "log": out[-1500:],
            "skipped": [] if CUDA else ["bf16 and MFU (CUDA only), inductor (aot_eager on CPU), ViL flex",
                                        "ViL-S/B and the other families at 224 (two tiny variants at 64 px on CPU)"]}


def check_training(work: Path) -> dict:
    steps, ckpt_at, kill_after = (60, 30, 33) if CUDA else (12, 6, 8)
    data = work / "demo_data"
    rc, out, _ = _run(["-m", "data.demo", "--out", str(data), "--classes", "10", "--per-class", "60",
                       "--size", "256" if CUDA else "64", "--quiet"], 600)
    if rc:
        return {"ok": False, "error": out[-2000:]}
    common = [f"data.train={data}#train", "data.eval=", f"train.max_steps={steps}",
              f"checkpoint.every_steps={ckpt_at}", "checkpoint.every_minutes=0", "deepspeed.zero_stage=2",
              "run.provenance=false", "log.every_steps=1", "aug.mixup=0", "aug.cutmix=0"]
    common += (["model.name=vil_small_rpb_224", "precision=bf16", "train.compile=true", "data.pipeline=dali",
                "train.micro_batch=32", "data.workers=8"] if CUDA else
               ["model.name=vil_tiny_rpb_224", "model.img_size=64", "precision=auto", "data.pipeline=torch",
                "data.workers=0", "train.micro_batch=8", "model.kwargs={depths: [1, 1, 1, 1]}"])
    nproc = 1 if CUDA else 2
    t0 = time.time()
    ref = start_ranks([f"run.dir={work / 'ref'}", *common], work / "ref", nproc)
    codes = [p.wait(timeout=1800) for p in ref]
    run = work / "killed"
    procs = start_ranks([f"run.dir={run}", *common], work / "killed", nproc)
    killed = run_until(procs, lambda: max(step_losses(run), default=0) >= kill_after, 1800)
    procs = start_ranks([f"run.dir={run}", *common], work / "killed", nproc)
    codes += [p.wait(timeout=1800) for p in procs]
    same = step_losses(run) == step_losses(work / "ref") and len(step_losses(run)) == steps
    return {"ok": killed and same and set(codes) == {0}, "steps": steps, "checkpoint_at": ckpt_at,
            "killed_after_step": kill_after, "losses_identical": same, "exit_codes": codes,
            "seconds": round(time.time() - t0, 1),
            "settings": common, "skipped": [] if CUDA else ["DALI mixed, bf16 on GPU and compile (CUDA form only)"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "runs/gpu_check.json"))
    ap.add_argument("--parts", nargs="+", default=["data", "models", "train"], choices=["data", "models", "train"])
    args = ap.parse_args(argv)
    device = torch.cuda.get_device_name(0) if CUDA else "CPU (no CUDA device: reduced form)"
    report = {"device": device, "form": "cuda" if CUDA else "cpu-reduced", "torch": torch.__version__}
    work = Path(tempfile.mkdtemp(prefix="hvp_gpu_check_"))
    for part, fn in (("data", check_data), ("models", check_models), ("train", check_training)):
        if part in args.parts:
            print(f"== {part}", flush=True)
            report[part] = fn(work)
            print(json.dumps({k: v for k, v in report[part].items() if k not in ("rows", "log")}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    ok = all(report[p]["ok"] for p in args.parts)
    print(f"{device}: {'all parts ran' if ok else 'FAILED'}; report {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
