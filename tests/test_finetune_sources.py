"""pretrain.weights: every kind of checkpoint -> the same fp32 state dict.

Real DeepSpeed checkpoints (ZeRO 0/1/2/3, fp32 and bf16) are written by one subprocess (1 process, gloo).
"""
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.weights import SourceError, load_state_dict, load_with_info, resolve_source
from finetune_testlib import DS_KWARGS, DS_MODEL, DS_STAGES, make_ds_runs


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"stages.0.w": torch.randn(3, 4, generator=g), "head.weight": torch.randn(2, 4, generator=g),
            "head.bias": torch.zeros(2), "stages.0.idx": torch.arange(5)}


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", ["plain", "model", "module", "state_dict", "prefix", "model+prefix"])
def test_torch_files_and_release_wrappers(tmp_path, wrap):
    sd = _sd()
    prefixed = {"module." + k: v for k, v in sd.items()}
    obj = {"plain": sd, "model": {"model": sd, "epoch": 3}, "module": {"module": sd},
           "state_dict": {"state_dict": sd, "optimizer": {"lr": 0.1}}, "prefix": prefixed,
           "model+prefix": {"model": prefixed}}[wrap]
    p = tmp_path / "w.pth"
    torch.save(obj, p)
    _same(load_state_dict(p), sd)


def test_bf16_becomes_fp32_and_ema_entry(tmp_path):
    sd = _sd()
    ema = {k: (v * 2 if v.is_floating_point() else v) for k, v in sd.items()}
    p = tmp_path / "release.pth"
    torch.save({"model": {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()},
                "model_ema": ema}, p)
    raw = load_state_dict(p)
    assert raw["stages.0.w"].dtype == torch.float32 and raw["stages.0.idx"].dtype == torch.int64
    torch.testing.assert_close(raw["stages.0.w"], sd["stages.0.w"], atol=0.02, rtol=0.01)
    _same(load_state_dict(p, ema=True), ema)
    torch.save({"model": sd}, tmp_path / "noema.pth")
    with pytest.raises(SourceError, match="model_ema"):
        load_state_dict(tmp_path / "noema.pth", ema=True)


def test_safetensors(tmp_path):
    sd = _sd()
    save_file(sd, str(tmp_path / "w.safetensors"))
    _same(load_state_dict(tmp_path / "w.safetensors"), sd)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_refuses_arbitrary_pickles(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": _Evil()}, f, protocol=2)
    with pytest.raises(SourceError, match="weights-only"):
        load_state_dict(p)


class _CreatesFile:
    """A pickle payload with a side effect: unpickling it would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.mark.parametrize("where", ["file", "stage0_tag", "zero_tag"])
def test_payload_pickles_are_never_unpickled(ds_runs, tmp_path, where):
    """A file that would run code when unpickled is refused with one line on every load path (a released
    file, a DeepSpeed model-states file, DeepSpeed's consolidation of ZeRO shards); the code never runs."""
    import shutil
    marker = tmp_path / "payload_ran"
    evil = {"module": {"w": torch.zeros(1)}, "extra": _CreatesFile(marker)}
    if where == "file":
        target = tmp_path / "evil.pt"
        torch.save(evil, target)
    else:
        stage = 0 if where == "stage0_tag" else 2
        target = tmp_path / "run" / "checkpoints" / "global_step1"
        shutil.copytree(ds_runs / f"run_s{stage}" / "checkpoints" / "global_step1", target)
        victim = sorted(target.glob("*model_states.pt" if stage == 0 else "*optim_states.pt"))[0]
        torch.save(evil, victim)
    with pytest.raises(SourceError) as err:
        load_state_dict(target)
    msg = str(err.value)
    assert "\n" not in msg and "weights-only" in msg and "os.makedirs" in msg, msg
    assert not marker.exists()


def test_bad_paths(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not a run directory"):
        load_state_dict(tmp_path / "empty")


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    return make_ds_runs(tmp_path_factory)


@pytest.mark.parametrize("stage", sorted(DS_STAGES))
def test_deepspeed_zero_checkpoints(ds_runs, stage):
    run = ds_runs / f"run_s{stage}"
    ref = load_file(str(run / "reference.safetensors"))
    bf16 = DS_STAGES[stage] == "bf16"
    views = {"run": run, "ckpt_dir": run / "checkpoints", "tag_dir": run / "checkpoints" / "global_step1"}
    for how, path in views.items():
        sd, src = load_with_info(path)
        assert src.kind == ("run" if how == "run" else "deepspeed"), how
        assert src.model_name == DS_MODEL and src.model_kwargs["img_size"] == DS_KWARGS["img_size"]
        assert set(sd) >= {k for k in ref if "relative_position_index" not in k}, how
        for k, v in ref.items():
            if k not in sd:
                continue
            assert sd[k].dtype == torch.float32, k
            if bf16:  # fp32 master weights; the module holds their bf16 copy
                torch.testing.assert_close(sd[k].bfloat16().float(), v, atol=0, rtol=0)
            else:
                assert torch.equal(sd[k], v), (how, k)
    # EMA weights saved by the engine in the tag folder
    ema = load_state_dict(run, ema=True)
    _same(ema, load_file(str(run / "checkpoints" / "global_step1" / "ema.safetensors")))


def test_deepspeed_consolidated_loads_strictly(ds_runs):
    from finetune_testlib import tiny
    model = tiny(DS_MODEL, **DS_KWARGS)
    sd = load_state_dict(ds_runs / "run_s3")
    from pretrain.surgery import adapt_state_dict
    model.load_state_dict(adapt_state_dict(sd, model), strict=True)


def test_latest_pointer_and_missing_ema(ds_runs, tmp_path):
    src = resolve_source(ds_runs / "run_s2")
    assert src.file.endswith("global_step1")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("global_step9")
    with pytest.raises(SourceError, match="global_step9"):
        resolve_source(tmp_path / "ck")
    import shutil
    tag = tmp_path / "run" / "checkpoints" / "global_step1"
    shutil.copytree(ds_runs / "run_s0" / "checkpoints" / "global_step1", tag)
    (tag / "ema.safetensors").unlink()
    with pytest.raises(SourceError, match="ema"):
        load_state_dict(tag, ema=True)


def test_engine_complete_markers(ds_runs, tmp_path):
    """pretrain.rundir marks finished tags with COMPLETE: without `latest` the newest complete tag is
    used, and a half-written tag is refused."""
    import shutil
    ck = tmp_path / "checkpoints"
    src = ds_runs / "run_s0" / "checkpoints" / "global_step1"
    for tag in ("step_00000001", "step_00000002", "step_00000003"):
        shutil.copytree(src, ck / tag)
    for tag in ("step_00000001", "step_00000002"):
        (ck / tag / "COMPLETE").write_text("1\n")
    assert resolve_source(ck).file == str(ck / "step_00000002")
    with pytest.raises(SourceError, match="incomplete"):
        load_state_dict(ck / "step_00000003")
    assert load_state_dict(ck / "step_00000001")
