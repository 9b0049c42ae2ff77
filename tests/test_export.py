"""finetune.export: timm / mmdet / detectron2 from a real DeepSpeed run directory, each reloaded and compared."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.export import ExportError, export, main
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
    assert main(["--ckpt", str(run_dir), "--format", "timm", "mmdet", "detectron2"]) == 0
    out = run_dir / "exports"
    for name in ("model.safetensors", "config.json", "mmdet_backbone.pth", "detectron2_backbone.pkl",
                 "export_report.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "export_report.json").read_text())
    assert set(rep["formats"]) == {"timm", "mmdet", "detectron2"}
    assert all(r["verified"] for r in rep["formats"].values()) and rep["ema"] is False
    assert "verified" in capsys.readouterr().out
    # the export folder is itself a source (e.g. finetune.init=RUN/exports)
    from finetune.sources import load_with_info
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

    # mmdet: backbone. prefix, head dropped, plain tensors (weights_only loadable), meta
    mm = torch.load(out / "mmdet_backbone.pth", weights_only=True)
    assert all(k.startswith("backbone.") for k in mm["state_dict"])
    assert not any(k.startswith("backbone.head.") for k in mm["state_dict"])
    assert mm["meta"]["timm_model"] == DS_MODEL and len(mm["meta"]["feature_info"]) == 4

    # detectron2: numpy arrays under backbone.bottom_up., matching heuristics on
    with open(out / "detectron2_backbone.pkl", "rb") as f:
        d2 = pickle.load(f)
    assert d2["matching_heuristics"] is True
    assert all(k.startswith("backbone.bottom_up.") for k in d2["model"])
    assert not any(".head." in k for k in d2["model"])
    import numpy as np
    assert all(isinstance(v, np.ndarray) for v in d2["model"].values())
    # same stage features as the source after stripping the prefix
    bb = tiny(DS_MODEL, **{**DS_KWARGS, "num_classes": 0})
    bb.load_state_dict({k[len("backbone.bottom_up."):]: torch.from_numpy(v) for k, v in d2["model"].items()})
    with torch.no_grad():
        for a, b in zip(bb.forward_intermediates(x, intermediates_only=True),
                        ref.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ema_export(run_dir, tmp_path):
    rep = export(run_dir, ["timm"], out=tmp_path / "ema", ema=True)
    assert rep["ema"] is True and rep["formats"]["timm"]["verified"]
    got = load_file(str(tmp_path / "ema" / "model.safetensors"))
    ema = load_file(str(run_dir / "checkpoints" / "global_step1" / "ema.safetensors"))
    raw = load_file(str(run_dir / "reference.safetensors"))
    k = "head.weight"
    assert torch.equal(got[k], ema[k]) and not torch.equal(got[k], raw[k])


def test_restv2_file_export_features_only_path(tmp_path):
    """A weights file (no run config): --model names it; ResTv2's features_only model has its own fresh
    detection norms, so that path is checked by shapes while the strict head-less reload is exact."""
    name, _, kw = TINY["restv2"]
    m = tiny(name, **kw)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    rep = export(tmp_path / "w.safetensors", ["mmdet", "detectron2"], model_name=name,
                 model_kwargs={"depths": kw["depths"], "img_size": 64})
    assert rep["out"] == str(tmp_path / "exports")
    for fmt in ("mmdet", "detectron2"):
        r = rep["formats"][fmt]
        assert r["verified"] and r["max_abs_diff"] <= 1e-5 and "out_norms" in r["features_only"]


def test_export_errors(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ExportError, match="--model"):
        export(tmp_path / "w.safetensors", ["timm"])
    with pytest.raises(ExportError, match="unknown export format"):
        export(tmp_path / "w.safetensors", ["onnx"])
    assert main(["--ckpt", str(tmp_path / "missing"), "--format", "timm"]) == 1


@pytest.mark.parametrize("fam", ["vil_ape", "msg", "scalable_vit", "ms_mlp"])
def test_other_families_backbone_export(fam, tmp_path):
    """Every family's backbone export reloads to the same stage features (strict head-less model and the
    features_only path)."""
    name, _, kw = TINY[fam]
    m = tiny(name, **kw)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    rep = export(tmp_path / "w.safetensors", ["mmdet"], model_name=name, model_kwargs={"depths": kw["depths"]})
    r = rep["formats"]["mmdet"]
    assert r["verified"] and r["max_abs_diff"] <= 1e-5 and r["features_only"] <= 1e-5
