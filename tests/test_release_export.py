"""Export into each paper's released checkpoint layout (``--format release`` / ``release-d2``).

* every listed release variant: the export's keys, shapes and dtypes are the official listing's, in its
  order (all five releases save ``model.state_dict()``, an ordered dict), inside the release's container;
* round trip in float64: release export -> ``checkpoint_filter_fn`` -> our model gives the source model's
  logits bit for bit (every family, a ViL model finetuned at 384, a 21K-head model);
* golden cross-check: each golden fixture's generated released-format dict, loaded through the filter and
  exported again, comes back tensor for tensor;
* the detectron2 files are what the releases' own converters write.

Big variants are built on the meta device (shapes without weights); numerics use one block per stage.
"""
from __future__ import annotations

import io
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the families)
from finetune.export import main, release_checkpoint, release_d2_checkpoint
from finetune_testlib import TINY
from golden import (GOLDEN, cached_listing_state_dict, golden_fixtures, load_meta, make_state_dict, meta_model,
                    read_listing, LISTINGS)
from models.family import family_of, release_layout_of

# official listing -> (our model, constructor arguments that reproduce it)
LISTING_MODELS = {
    "vil_tiny": ("vil_tiny_rpb_224", {}), "vil_small": ("vil_small_rpb_224", {}),
    "vil_small_ape": ("vil_small_ape_224", {}), "vil_medium_deep": ("vil_medium_rpb_224", {}),
    "vil_base_deep": ("vil_base_rpb_224", {}),
    "vil_medium_deep_384_f6f8": ("vil_medium_rpb_384", {}),                       # the paper's 384 windows
    "vil_medium_deep_384": ("vil_medium_rpb_384", {"windows": (7, 7, None, None)}),  # the release README's f7
    "vil_base_deep_384": ("vil_base_rpb_384", {}),
    "vil_medium_deep_in22k": ("vil_medium_rpb_224", {"num_classes": 21841}),
    "msg_tiny": ("msg_transformer_tiny_224", {}), "msg_small": ("msg_transformer_small_224", {}),
    "msg_base": ("msg_transformer_base_224", {}),
    "scalablevit_small": ("scalable_vit_small_224", {}), "scalablevit_base": ("scalable_vit_base_224", {}),
    "scalablevit_large": ("scalable_vit_large_224", {}),
    "restv2_tiny": ("restv2_tiny_224", {}), "restv2_small": ("restv2_small_224", {}),
    "restv2_base": ("restv2_base_224", {}), "restv2_large": ("restv2_large_224", {}),
    "msmlp_tiny": ("ms_mlp_tiny_224", {}), "msmlp_small": ("ms_mlp_small_224", {}),
    "msmlp_base": ("ms_mlp_base_224", {}),
}
CONTAINERS = {"vil": ("net", {"arch": "msvit"}), "msg_transformer": ("model", {}), "scalable_vit": ("model", {}),
              "restv2": ("model", {}), "ms_mlp": ("model", {})}
PREFIX = "backbone.bottom_up."


def _rows(listing: str):
    return read_listing(LISTINGS / f"{listing}.tsv")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


@pytest.mark.parametrize("listing", sorted(LISTING_MODELS))
def test_release_export_is_the_official_listing(listing):
    """Keys, shapes, dtypes and order of ``--format release`` equal the official ``state_dict()`` listing;
    tied entries are one tensor twice (as ``state_dict()`` gives them); the container is the release's."""
    name, kwargs = LISTING_MODELS[listing]
    model = meta_model(name, **kwargs)
    ckpt = release_checkpoint(model)
    container, extra = CONTAINERS[family_of(model).name]
    assert set(ckpt) == {container, *extra} and all(ckpt[k] == v for k, v in extra.items())
    sd = ckpt[container]
    rows = _rows(listing)
    assert [(k, tuple(v.shape), _dtype(v)) for k, v in sd.items()] == [(k, s, dt) for k, s, dt, _ in rows]
    for k, _, _, alias in rows:
        if alias:
            assert sd[k] is sd[alias], k
    # --no-head: the same listing without the classifier (ScalableViT keeps its pre-logits head.0 / head.1)
    clf = model.pretrained_cfg["classifier"] + "."
    headless = release_checkpoint(model, include_head=False)[container]
    assert list(headless) == [k for k, *_ in rows if not k.startswith(clf)]


def test_every_registered_variant_goes_back_through_its_filter():
    """Every registered variant and resolution (224 and 384 windows, tables, APE): its release export loads back
    through the family filter strictly into the same model (meta device; the tied copies get real zeros,
    since ViL's filter compares them by value)."""
    names = [n for p in ("vil_*", "msg_transformer_*", "scalable_vit_*", "restv2_*", "ms_mlp_*")
             for n in timm.list_models(p)]
    assert len(names) == 16 + 6 + 6 + 8 + 6
    for name in names:
        model = meta_model(name)
        ckpt = release_checkpoint(model)
        container = release_layout_of(model).container
        sd = ckpt[container]
        counts = Counter(map(id, sd.values()))
        real = {id(v): torch.zeros(v.shape, dtype=v.dtype) for v in sd.values() if counts[id(v)] > 1}
        ckpt[container] = {k: real.get(id(v), v) for k, v in sd.items()}
        model.load_state_dict(family_of(model).filter_fn(ckpt, model), strict=True, assign=True)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every float entry of the state dict random (golden-v1's ranges), so a swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            u = torch.rand(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
            if k.endswith("running_var"):
                v.copy_(0.5 + u)
            elif v.dim() == 1 and k.endswith(".weight"):
                v.copy_(1 + 0.1 * (2 * u - 1))
            else:
                v.copy_(0.1 * (2 * u - 1))
    return model


def _through_file(obj):
    """torch.save -> torch.load(weights_only=True), as a downstream codebase reads the file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_round_trip(model: torch.nn.Module, name: str, x: torch.Tensor, **kwargs) -> dict:
    """release export of ``model`` -> file -> the family's filter -> a fresh ``name`` model: same logits, bit for bit."""
    ckpt = _through_file(release_checkpoint(model))
    fresh = timm.create_model(name, **kwargs).double().eval()
    fresh.load_state_dict(family_of(fresh).filter_fn(ckpt, fresh), strict=True)
    with torch.no_grad():
        ref, got = model(x), fresh(x)
    assert torch.equal(ref, got), (ref - got).abs().max()
    return ckpt


@pytest.mark.parametrize("fam", sorted(TINY))
def test_round_trip_float64(fam):
    name, _, kw = TINY[fam]
    kw = dict(kw, drop_path_rate=0.0, **({"img_size": 96} if fam.startswith("vil") else {}))
    model = _randomise(timm.create_model(name, **kw).double().eval())
    x = torch.rand(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _assert_round_trip(model, name, x, **kw)


def test_round_trip_vil_finetuned_384_and_21k_head():
    """A 21K-head ViL (224) finetuned at 384 through the filter (tables resized 27^2 -> 23^2 / 31^2 / 47^2 /
    23^2, windows 7 -> 6, 8): its release export has the 384 release's shapes and round-trips exactly."""
    kw = dict(depths=(1, 1, 1, 1), drop_path_rate=0.0)
    src = _randomise(timm.create_model("vil_medium_rpb_224", num_classes=21841, **kw).double().eval())
    x224 = torch.rand(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ckpt = _assert_round_trip(src, "vil_medium_rpb_224", x224, num_classes=21841, **kw)    # the 21K head
    assert ckpt["net"]["head.weight"].shape == (21841, 768)

    ft = timm.create_model("vil_medium_rpb_384", **kw).double().eval()
    sd = family_of(ft).filter_fn(ckpt, ft)                       # resolution surgery; 21K head left to the caller
    sd["head.weight"], sd["head.bias"] = ckpt["net"]["head.weight"][:1000], ckpt["net"]["head.bias"][:1000]
    ft.load_state_dict(sd, strict=True)
    out = release_checkpoint(ft)["net"]
    full = {k: s for k, s, *_ in _rows("vil_medium_deep_384_f6f8")}   # the release's 384 model (f6, f8)
    for k, v in out.items():
        assert tuple(v.shape) == full[k], k
    assert out["layer1.1.attn.local_relative_position_bias_table"].shape == (529, 3)
    x384 = torch.rand(1, 3, 384, 384, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _assert_round_trip(ft, "vil_medium_rpb_384", x384, **kw)


# ---- golden cross-check -------------------------------------------------------------------------------

def _fixture_model(meta: dict) -> str:
    name, kwargs = LISTING_MODELS[meta["listing"][:-len(".tsv")]]
    assert not kwargs
    return name.replace("_224", f"_{meta['size']}")


@pytest.mark.parametrize("fixture", [p for p in golden_fixtures() if "listing" in load_meta(p)], ids=lambda p: p.name)
def test_golden_listing_comes_back(fixture):
    """The generated released-format dict (golden-v1), loaded through the filter into our model and exported
    with ``--format release``, is the generated dict again: same keys in order, the same values exactly."""
    meta = load_meta(fixture)
    stem = meta["listing"][:-len(".tsv")]
    sd = make_state_dict(_rows(stem), meta["seed"])
    model = meta_model(_fixture_model(meta))
    model.load_state_dict(family_of(model).filter_fn(sd, model), strict=True, assign=True)
    out = release_checkpoint(model)[release_layout_of(model).container]
    rows = _rows(stem)
    assert list(out) == [k for k, *_ in rows]
    for k, shape, dtype, alias in rows:
        if k in sd:                                   # every generated (float) row; integer rows are the model's
            assert torch.equal(out[k], sd[k]), k
        else:
            assert dtype == "int64" and tuple(out[k].shape) == shape, k


def test_golden_surgery_fixture_exports_the_release_384_adaptation():
    """The 224 21K release adapted to 384 by the filter (the release's own finetune loader, bilinear) and
    exported: the 384 release's listing, the release's resized tables, every other tensor unchanged."""
    fixture = GOLDEN / "vil_medium_deep_surgery_224to384"
    meta = load_meta(fixture)
    src = make_state_dict(_rows(meta["source"]["listing"][:-len(".tsv")]), meta["seed"])
    model = meta_model("vil_medium_rpb_384")
    sd = family_of(model).filter_fn(src, model)
    sd["head.weight"], sd["head.bias"] = src["head.weight"][:1000], src["head.bias"][:1000]   # "rows 0..999"
    model.load_state_dict(sd, strict=True, assign=True)
    out = release_checkpoint(model)["net"]
    rows = _rows(meta["target"]["listing"][:-len(".tsv")])
    assert [(k, tuple(v.shape)) for k, v in out.items()] == [(k, s) for k, s, *_ in rows]
    tables = torch.load(fixture / "resized_tables.pt", weights_only=True)
    for k, ref in tables.items():
        torch.testing.assert_close(out[k], ref, atol=1e-12, rtol=0)
    resized = [k for k, s, dt, _ in rows if dt == "float32" and tuple(src[k].shape) != s and not k.startswith("head.")]
    assert set(tables) < set(resized) and all(k.endswith("local_relative_position_bias_table") for k in resized)
    same = [k for k, s, dt, _ in rows if dt == "float32" and k not in resized and not k.startswith("head.")]
    assert len(same) > 300
    for k in same:
        assert torch.equal(out[k], src[k]), k


# ---- detectron2 converters ----------------------------------------------------------------------------

def _tiny(name: str, **kw) -> torch.nn.Module:
    return _randomise(timm.create_model(name, depths=(1, 1, 1, 1), drop_path_rate=0.0, **kw).eval())


def test_vil_release_d2_is_the_converter_output():
    """ViL's converter (VisionLongformerForObjectDetection ``converter.py``) for its ``*_sparse`` detection
    configs: stages 3-4 become Vision Longformer stages, so ``qkv`` is split into ``query`` / ``kv`` (and
    their tied ``*_global``), the full-attention table is resized to the (4w-1)^2 local table, index
    buffers are dropped; the rest is the release export unchanged, under ``backbone.bottom_up.``."""
    model = _tiny("vil_tiny_rpb_224")
    rel = release_checkpoint(model)["net"]
    d2 = release_d2_checkpoint(model)
    assert set(d2) == {"model"}
    sd = d2["model"]
    assert all(k.startswith(PREFIX) for k in sd) and not any("relative_position_index" in k for k in sd)
    got = {k[len(PREFIX):]: v for k, v in sd.items()}
    changed = ("layer3.1.attn.qkv.weight", "layer3.1.attn.qkv.bias", "layer4.1.attn.qkv.weight",
               "layer4.1.attn.qkv.bias", "layer4.1.attn.local_relative_position_bias_table")
    for k, v in rel.items():                                    # everything else: as exported
        if "relative_position_index" not in k and k not in changed:
            assert torch.equal(got[k], v), k
    c = 192
    qkv = rel["layer3.1.attn.qkv.weight"]
    for name, part in (("query", qkv[:c]), ("query_global", qkv[:c]), ("kv", qkv[c:]), ("kv_global", qkv[c:])):
        assert torch.equal(got[f"layer3.1.attn.{name}.weight"], part), name
    assert torch.equal(got["layer4.1.attn.proj_global.weight"], rel["layer4.1.attn.proj.weight"])
    assert "layer3.1.attn.qkv.weight" not in got
    # 13^2 full-attention table of stage 4 -> the 27^2 local table, bilinear over the offset grid
    t = rel["layer4.1.attn.local_relative_position_bias_table"]
    ref = F.interpolate(t.reshape(1, 13, 13, -1).permute(0, 3, 1, 2), size=(27, 27), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).reshape(27 * 27, -1)
    torch.testing.assert_close(got["layer4.1.attn.local_relative_position_bias_table"], ref, atol=1e-6, rtol=0)
    # it is a complete checkpoint of the detection backbone: strict through the family filter
    det = release_layout_of(model).d2_target_fn(model)
    det.load_state_dict(family_of(det).filter_fn(got, det), strict=True, assign=True)
    # the README's medium_sparse style (a full-attention stage 4 at INPUT.MAX_SIZE_TRAIN=1333): 13^2 -> 83^2
    arch = "l1,h1,d48,n1,s1,g1,p4,f7,a0_l2,h3,d96,n1,s1,g1,p2,f7,a0_l3,h3,d192,n1,s1,g1,p2,f7,a0_l4,h6,d384,n1,s0,g0,p2,f7,a0"
    sd = release_d2_checkpoint(model, arch=arch, img_size=1333)["model"]
    assert sd[PREFIX + "layer4.1.attn.local_relative_position_bias_table"].shape == (83 * 83, 6)
    assert torch.equal(sd[PREFIX + "layer4.1.attn.qkv.weight"], rel["layer4.1.attn.qkv.weight"])


def test_restv2_release_d2_is_the_converter_output():
    """ResTv2's ``convert_to_d2.py``: every classification key under ``backbone.bottom_up.``, flat, no container."""
    model = _tiny("restv2_tiny_224")
    rel = release_checkpoint(model)["model"]
    d2 = release_d2_checkpoint(model)
    assert list(d2) == [PREFIX + k for k in rel] and all(torch.equal(d2[PREFIX + k], v) for k, v in rel.items())


def test_release_d2_only_where_the_paper_ships_detectron2_code():
    for name in ("msg_transformer_tiny_224", "scalable_vit_small_224", "ms_mlp_tiny_224"):
        assert release_layout_of(meta_model(name)).d2_fn is None
    with pytest.raises(Exception, match="release-d2 is for ViL and ResTv2"):
        release_d2_checkpoint(meta_model("ms_mlp_tiny_224"))


def test_cli_release_from_a_golden_listing(tmp_path):
    """End to end through ``python -m finetune.export``: a released ViL-Tiny file in, ``release.pth`` out
    (float32, the release's container), equal to the input tensor by tensor."""
    sd = cached_listing_state_dict("vil_tiny")
    torch.save({"model": {k: v.float() for k, v in sd.items()}}, tmp_path / "vil_tiny.pth")
    assert main(["--ckpt", str(tmp_path / "vil_tiny.pth"), "--model", "vil_tiny_rpb_224",
                 "--format", "release", "--out", str(tmp_path / "out")]) == 0
    ckpt = torch.load(tmp_path / "out" / "release.pth", weights_only=True)
    assert ckpt["arch"] == "msvit"
    out = ckpt["net"]
    rows = _rows("vil_tiny")
    assert [(k, tuple(v.shape), _dtype(v)) for k, v in out.items()] == [(k, s, dt) for k, s, dt, _ in rows]
    for k, v in sd.items():
        assert torch.equal(out[k], v.float()), k
