"""finetune.export: timm / release / release-d2 from a real DeepSpeed run directory, each reloaded and compared.

(The release layouts themselves, variant by variant against the official listings: test_release_export.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.export import ExportError, export, main
from models.family import family_of, release_layout_of
from finetune_testlib import DS_KWARGS, DS_MODEL, TINY, make_ds_runs, tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_ds_runs(tmp_path_factory) / "run_s2"


def _reference_model(run_dir, weights="reference.safetensors"):
    model = tiny(DS_MODEL, **DS_KWARGS)
    sd = load_file(str(run_dir / weights)) if weights else None
    model.load_state_dict({k: v for k, v in sd.items() if "relative_position_index" not in k}, strict=False)
    return model


def test_cli_all_formats_default_out(run_dir, capsys):
    assert main(["--ckpt", str(run_dir), "--format", "timm", "release", "release-d2"]) == 0
    out = run_dir / "exports"
    for name in ("model.safetensors", "config.json", "release.pth", "release_d2.pth", "export_report.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "export_report.json").read_text())
    assert set(rep["formats"]) == {"timm", "release", "release-d2"}
    assert all(r["verified"] for r in rep["formats"].values()) and rep["ema"] is False
    assert "verified" in capsys.readouterr().out
    # the export folder is itself a source (e.g. finetune.init=RUN/exports)
    from pretrain.weights import load_with_info
    sd, src = load_with_info(out)
    assert src.kind == "export" and src.model_name == DS_MODEL and src.model_kwargs["num_classes"] == 10
    assert torch.equal(sd["head.weight"], load_file(str(out / "model.safetensors"))["head.weight"])

    # timm: config.json describes the model; both load forms give the source model's logits
    import timm
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == DS_MODEL and cfg["num_classes"] == 10
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64] and cfg["pretrained_cfg"]["mean"]
    assert cfg["model_args"]["img_size"] == 64
    ref = _reference_model(run_dir)
    x = torch.randn(2, 3, 64, 64)
    m = timm.create_model(DS_MODEL, pretrained=True, num_classes=10, **cfg["model_args"],
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10)).eval()
    m2 = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(m2(x), ref(x), atol=1e-5, rtol=0)

    # release: the ViL release's Checkpointer container, its key names (tied copies, index buffers), float32;
    # loads through the family filter into the source model's logits
    rel = torch.load(out / "release.pth", weights_only=True)
    assert set(rel) == {"net", "arch"} and rel["arch"] == "msvit"
    assert "layer1.1.attn.query_global.weight" in rel["net"] and "layer1.1.attn.relative_position_index" in rel["net"]
    assert not any(k.startswith("stages.") for k in rel["net"])
    assert {v.dtype for v in rel["net"].values()} == {torch.float32, torch.int64}
    m3 = tiny(DS_MODEL, **DS_KWARGS)
    m3.load_state_dict(family_of(m3).filter_fn(rel, m3), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m3(x), ref(x), atol=1e-5, rtol=0)

    # release-d2: what the release's converter writes, {'model': {'backbone.bottom_up.' + key}}, complete for the
    # detection backbone of its *_sparse configs (stages 3-4 as Vision Longformer: qkv split into query / kv)
    d2 = torch.load(out / "release_d2.pth", weights_only=True)
    assert set(d2) == {"model"} and all(k.startswith("backbone.bottom_up.") for k in d2["model"])
    stripped = {k[len("backbone.bottom_up."):]: v for k, v in d2["model"].items()}
    assert "layer3.1.attn.query.weight" in stripped and "layer3.1.attn.qkv.weight" not in stripped
    assert torch.equal(stripped["layer3.1.attn.query.weight"], rel["net"]["layer3.1.attn.qkv.weight"][:192])
    det = release_layout_of(m3).d2_target_fn(m3)
    det.reset_classifier(10)
    det.load_state_dict(family_of(det).filter_fn(stripped, det), strict=True, assign=True)
    assert rep["formats"]["release-d2"]["loads_into_detection_backbone"] is True


def test_ema_export(run_dir, tmp_path):
    rep = export(run_dir, ["timm"], out=tmp_path / "ema", ema=True)
    assert rep["ema"] is True and rep["formats"]["timm"]["verified"]
    got = load_file(str(tmp_path / "ema" / "model.safetensors"))
    ema = load_file(str(run_dir / "checkpoints" / "global_step1" / "ema.safetensors"))
    raw = load_file(str(run_dir / "reference.safetensors"))
    k = "head.weight"
    assert torch.equal(got[k], ema[k]) and not torch.equal(got[k], raw[k])


def test_restv2_file_export_release_formats(tmp_path):
    """A weights file (no run config): --model names it. release (ResT's {'model': ...}) and release-d2 (what
    convert_to_d2.py writes: flat, backbone.bottom_up.) both reload to the source model's logits; the d2 file
    also loads into a features_only model (ResTv2's detection norms are its own, fresh: shapes only)."""
    import timm
    name, _, kw = TINY["restv2"]
    m = tiny(name, **kw)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    rep = export(tmp_path / "w.safetensors", ["release", "release-d2"], model_name=name,
                 model_kwargs={"depths": kw["depths"], "img_size": 64})
    assert rep["out"] == str(tmp_path / "exports")
    for fmt in ("release", "release-d2"):
        r = rep["formats"][fmt]
        assert r["verified"] and r["max_abs_diff"] <= 1e-5
    assert set(torch.load(tmp_path / "exports" / "release.pth", weights_only=True)) == {"model"}
    d2 = torch.load(tmp_path / "exports" / "release_d2.pth", weights_only=True)
    assert "backbone.bottom_up.stem.proj.0.weight" in d2 and "backbone.bottom_up.stage1.0.attn.up.0.weight" in d2
    stripped = {k[len("backbone.bottom_up."):]: v for k, v in d2.items()}
    fo = timm.create_model(name, features_only=True, pretrained=True, depths=kw["depths"],
                           pretrained_cfg_overlay=dict(state_dict=stripped)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in fo(torch.randn(1, 3, 64, 64))] == [96, 192, 384, 768]


def test_export_errors(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ExportError, match="--model"):
        export(tmp_path / "w.safetensors", ["timm"])
    with pytest.raises(ExportError, match="unknown export format"):
        export(tmp_path / "w.safetensors", ["onnx"])
    with pytest.raises(ExportError, match="--format release-d2"):      # the replaced formats say what replaced them
        export(tmp_path / "w.safetensors", ["detectron2"])
    with pytest.raises(ExportError, match="--format release"):
        export(tmp_path / "w.safetensors", ["mmdet"])
    name, _, kw = TINY["msg"]
    save_file({k: v.contiguous() for k, v in tiny(name, **kw).state_dict().items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ExportError, match="release-d2 is for ViL and ResTv2"):
        export(tmp_path / "m.safetensors", ["release-d2"], model_name=name, model_kwargs={"depths": kw["depths"]})
    assert main(["--ckpt", str(tmp_path / "missing"), "--format", "timm"]) == 1


@pytest.mark.parametrize("fam", ["vil_ape", "msg", "scalable_vit", "ms_mlp"])
def test_other_families_release_export(fam, tmp_path):
    """Every family's release export, with and without the head, reloads through its filter to the same
    logits (head-less: the same stage features)."""
    name, _, kw = TINY[fam]
    m = tiny(name, **kw)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for head in (True, False):
        rep = export(tmp_path / "w.safetensors", ["release"], out=tmp_path / f"head{head}", model_name=name,
                     model_kwargs={"depths": kw["depths"]}, include_head=head)
        r = rep["formats"]["release"]
        assert r["verified"] and r["max_abs_diff"] <= 1e-5 and r["head"] is head
        sd = torch.load(tmp_path / f"head{head}" / "release.pth", weights_only=True)[r["container"]]
        assert any(k.startswith(m.pretrained_cfg["classifier"] + ".") for k in sd) is head
