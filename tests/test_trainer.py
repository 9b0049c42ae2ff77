"""The Trainer's start-up contract: precision that fits the hardware (agreed by all ranks), a global batch
a recipe can fix, evaluation at epoch ends, and configs refused before the run directory is touched."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine_utils import ROOT, TINY, Ranks, clean_env, make_demo_shards, run_ranks, step_losses
from pretrain.config import ConfigError, load_config, resolve_grad_accum


# ---------------------------------------------------------------------------------------------------
# precision: auto


def _resolve_in_subprocess(requested: str, env: dict) -> dict:
    code = ("import json, logging, torch; logging.basicConfig(level=logging.WARNING);"
            "from pretrain.precision import resolve_precision, native_bf16;"
            f"v, why = resolve_precision({requested!r}, torch.device('cpu'));"
            "print(json.dumps({'value': v, 'why': why, 'native': native_bf16(torch.device('cpu'))[0],"
            "'capability': torch.backends.cpu.get_cpu_capability()}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr}


def test_auto_is_fp32_where_bf16_would_be_emulated():
    """ATEN_CPU_CAPABILITY=avx2 makes PyTorch run its AVX2 kernels, as on a CPU without AVX-512: there bf16
    is emulated, so auto picks fp32; an explicit bf16 still runs, with one warning."""
    auto = _resolve_in_subprocess("auto", {"ATEN_CPU_CAPABILITY": "avx2"})
    assert auto["capability"] == "AVX2" and not auto["native"]
    assert auto["value"] == "fp32" and "emulated" in auto["why"]
    forced = _resolve_in_subprocess("bf16", {"ATEN_CPU_CAPABILITY": "avx2"})
    assert forced["value"] == "bf16"
    assert forced["stderr"].count("precision=bf16 as asked") == 1
    fp32 = _resolve_in_subprocess("fp32", {"ATEN_CPU_CAPABILITY": "avx2"})
    assert fp32["value"] == "fp32" and "as asked" not in fp32["stderr"]


def test_auto_follows_this_cpu():
    from pretrain.precision import cpu_flags

    here = _resolve_in_subprocess("auto", {})
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and here["capability"].startswith("AVX512")
    assert here["native"] == has_bf16
    assert here["value"] == ("bf16" if has_bf16 else "fp32")


def test_cpu_model_is_lscpus():
    from pretrain.precision import cpu_model

    r = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    names = [line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Model name")]
    assert names and cpu_model() == names[0], (names, cpu_model())


def test_config_accepts_auto_and_refuses_unknown():
    assert load_config(None, ["train.max_steps=1"]).precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["train.max_steps=1", "precision=fp16"])


# ---------------------------------------------------------------------------------------------------
# train.global_batch: grad_accum derived, impossible layouts refused


def test_global_batch_derives_grad_accum():
    t = load_config(None, ["train.max_steps=1", "train.micro_batch=64", "train.global_batch=512"]).train
    assert [resolve_grad_accum(t, w) for w in (8, 4, 2, 1)] == [1, 2, 4, 8]
    with pytest.raises(ConfigError, match=r"world size in \[1, 2, 4, 8\] or train.micro_batch= one of"):
        resolve_grad_accum(t, 32)
    with pytest.raises(ConfigError, match="cannot be reached"):
        resolve_grad_accum(t, 6)
    t2 = load_config(None, ["train.max_steps=1", "train.micro_batch=64", "train.global_batch=512",
                            "train.grad_accum=2"]).train
    assert resolve_grad_accum(t2, 4) == 2
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_grad_accum(t2, 8)
    plain = load_config(None, ["train.max_steps=1", "train.grad_accum=3"]).train
    assert resolve_grad_accum(plain, 5) == 3  # no global batch fixed: as configured


def test_384_recipe_fixes_its_global_batch():
    """The recipe's absolute lr is for 512 images per step: the sbatch layout gives it, 4 nodes x 8 refused."""
    cfg = load_config(ROOT / "finetune/configs/vil_base_in1k_384.yaml", ["finetune.init=x"])
    assert cfg.train.global_batch == 512 and cfg.optim.lr_scaling_base == 0
    assert cfg.finetune.head == "map21k"
    script = (ROOT / "slurm/finetune_vil_base_in1k_384.sh").read_text()
    nodes = int(script.split("#SBATCH --nodes=")[1].split()[0])
    tasks = int(script.split("#SBATCH --ntasks-per-node=")[1].split()[0])
    assert cfg.train.micro_batch * resolve_grad_accum(cfg.train, nodes * tasks) * nodes * tasks == 512
    with pytest.raises(ConfigError, match="train.global_batch"):
        resolve_grad_accum(cfg.train, 4 * 8)


# ---------------------------------------------------------------------------------------------------
# real runs


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """8 classes x 6 images: 2 optimizer steps per epoch at 2 ranks x micro 8."""
    return make_demo_shards(tmp_path_factory.mktemp("small") / "data", per_class=6, size=64)


def test_refused_before_the_run_dir_is_written(small_shards, tmp_path):
    """A model argument the family does not take, and training data that do not exist: exit 2 with one line,
    no run directory."""
    base = ["--config", "pretrain/configs/demo.yaml", "train.max_steps=1", *TINY]
    cases = {"kw": (["model.kwargs={winodw_size: 5}", f"data.train={small_shards}#train"],
                    "config key 'model.kwargs'"),
             "data": ([f"data.train={small_shards}/nope#train"], "config key 'data.train'")}
    for name, (extra, msg) in cases.items():
        run = tmp_path / name
        r = run_ranks(base + [f"run.dir={run}", "data.eval=", *extra], nproc=1, expect=2)
        errors = [line for line in r.output(0).splitlines() if " ERROR " in line]
        assert len(errors) == 1 and msg in errors[0], r.output(0)
        assert not run.exists()


def test_size_the_model_refuses_is_a_config_error():
    """MSG-T takes multiples of 32 but needs 4x4 first-stage windows: 64 px passes the config's stride check
    and is refused by the model itself, in build_model (before the Trainer writes the run directory: the
    model.kwargs case above checks that order end to end)."""
    from pretrain.engine import build_model

    cfg = load_config(None, ["train.max_steps=1", "model.name=msg_transformer_tiny_224", "model.img_size=64"])
    with pytest.raises(ConfigError, match=r"'model.img_size'=64 for msg_transformer_tiny_224: the first stage has "
                                          r"3x3 windows, fewer than its shuffle size 4"):
        build_model(cfg, 8)
    tiny = build_model(load_config(None, ["train.max_steps=1", "model.name=vil_tiny_rpb_224",
                                          "model.img_size=64"]), 8)
    assert all(m.training for m in tiny.modules())  # the check's eval() is undone: drop path still trains


def test_auto_precision_agreed_and_epoch_evaluation(small_shards, tmp_path):
    """Rank 1 runs PyTorch's AVX2 kernels (no native bf16): both ranks train fp32 and config.yaml records it.
    eval.every_epoch evaluates at each epoch end as well as after the last step."""
    run = tmp_path / "run"
    args = ["--config", "pretrain/configs/demo.yaml", f"run.dir={run}", f"data.train={small_shards}#train",
            f"data.eval={small_shards}#val", *TINY, "precision=auto", "train.max_steps=0", "train.epochs=2",
            "eval.every_steps=0",
            "eval.every_epoch=true", "data.verify_samples=decode", "deepspeed.zero_stage=1"]
    ranks = Ranks(args, nproc=2, env=None, rank_env={1: {"ATEN_CPU_CAPABILITY": "avx2"}})
    assert ranks.wait() == [0, 0], ranks.output(0)
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "fp32"
    out = ranks.output(0, tail=None)
    assert "precision fp32 (auto: " in out
    if "CPU has" in out or "supports bf16" in out:  # rank 0 alone would have chosen bf16
        assert "another rank of this job has no native bf16" in out
    losses = step_losses(run)
    per_epoch = len(losses) // 2
    evals = [json.loads(line)["step"] for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert per_epoch >= 1 and evals == [per_epoch, 2 * per_epoch], (evals, sorted(losses))
    assert os.path.isfile(run / "checkpoints" / "latest")


def test_ranks_that_index_different_samples_stop(small_shards, tmp_path):
    """Rank 1 reads a stale index cache that lacks one sample: the ranks compare a hash of their sample
    tables and stop with one clear error before training."""
    stale = tmp_path / "stale_cache"
    code = (f"from data.shards import resolve, validate_shards; "
            f"validate_shards(resolve({str(small_shards) + '#train'!r}))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env({"HVP_DATA_CACHE": str(stale)}),
                   check=True, timeout=120)
    for meta in stale.glob("*.json"):
        rec = json.loads(meta.read_text())
        rec["samples"] = rec["samples"][:-1]
        meta.write_text(json.dumps(rec))
    run = tmp_path / "run"
    args = ["--config", "pretrain/configs/demo.yaml", f"run.dir={run}", f"data.train={small_shards}#train",
            "data.eval=", *TINY, "train.max_steps=2"]  # data.verify_samples=markers, as the cache was written
    ranks = Ranks(args, nproc=2, env={"HVP_DATA_CACHE": str(tmp_path / "fresh_cache")},
                  rank_env={1: {"HVP_DATA_CACHE": str(stale)}})
    assert ranks.wait() == [1, 1]
    assert "indexed different training samples" in ranks.output(0)
    assert not (run / "checkpoints").exists()
