"""ViL: golden equivalence with the release, checkpoint loading/surgery, counts, sizes a model is built for.

What every family shares (forward/backward of every variant, features_only, grad checkpointing, classifier,
parameter groups, refused input sizes) is in tests/test_models_common.py."""
import pytest
import timm
import torch

import models.vil as vil
from golden import (GOLDEN, LISTINGS, golden_fixtures, load_logits, load_meta, make_input, make_state_dict, meta_model,
                    read_listing)
from models.measure import count_macs, count_params

_DEPTHS = {(1, 1, 9, 1): "tiny", (1, 2, 8, 1): "small", (1, 4, 16, 1): "medium", (1, 8, 24, 1): "base"}


def _model_for(kwargs: dict, **extra) -> torch.nn.Module:
    """Our registered model equivalent to a release constructor call (arch string parsed)."""
    stages = [dict((a[0], int(a[1:])) for a in st.split(",")) for st in kwargs["arch"].split("_")]
    size = _DEPTHS[tuple(s["n"] for s in stages)]
    pos = "ape" if stages[0].get("a", 1) else "rpb"
    res = kwargs["img_size"]
    windows = tuple(s["f"] if s.get("s", 1) else None for s in stages)
    m = timm.create_model(f"vil_{size}_{pos}_{res}", windows=windows, num_classes=kwargs["num_classes"],
                          drop_path_rate=0.0, **extra)
    assert [s.patch_embed.cls_token.shape[1] if s.patch_embed.cls_token is not None else 0 for s in m.stages] \
        == [s.get("g", 1) for s in stages]
    assert [st.patch_embed.proj.out_channels for st in m.stages] == [s["d"] for s in stages]
    return m


def _checksum(sd, rows):
    keys = [k for k, _, dt, alias in rows if dt.startswith("float") and not alias]
    return len(keys), sum(sd[k].sum().item() for k in keys), sum((sd[k] * sd[k]).sum().item() for k in keys)


VIL_FIXTURES = [p for p in golden_fixtures("vil_") if "listing" in load_meta(p)]


@pytest.mark.parametrize("fixture", VIL_FIXTURES, ids=lambda p: p.name)
def test_golden_logits(fixture):
    meta = load_meta(fixture)
    rows = read_listing(LISTINGS / meta["listing"])
    sd = make_state_dict(rows, meta["seed"])
    n, s, s2 = _checksum(sd, rows)
    ck = meta["state_dict_checksum"]
    assert n == ck["generated_tensors"]
    assert s == pytest.approx(ck["sum"], rel=1e-12) and s2 == pytest.approx(ck["sum_of_squares"], rel=1e-12)
    model = _model_for(meta["official_constructor"]["kwargs"]).double().eval()
    model.load_state_dict(vil.checkpoint_filter_fn(sd, model), strict=True)
    x = make_input(**meta["input"])
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        logits = model.forward_head(final)
    torch.testing.assert_close(logits, load_logits(fixture), atol=1e-8, rtol=1e-8)
    ref = torch.load(fixture / "features.pt", weights_only=True)   # stage by stage too
    for i, fm in enumerate(feats):
        c = fm.shape[1]
        torch.testing.assert_close(fm[0, ::c // 16], ref[f"stage{i + 1}"], atol=1e-8, rtol=1e-8)


def test_golden_surgery_224_to_384():
    fixture = GOLDEN / "vil_medium_deep_surgery_224to384"
    meta = load_meta(fixture)
    sd = make_state_dict(read_listing(LISTINGS / meta["source"]["listing"]), meta["seed"])
    model = _model_for(meta["target"]["official_constructor"]["kwargs"]).double().eval()
    out = vil.checkpoint_filter_fn(sd, model)
    assert "head.weight" not in out and "head.bias" not in out     # 21841-class head left to the caller
    out["head.weight"], out["head.bias"] = sd["head.weight"][:1000], sd["head.bias"][:1000]  # "rows 0..999"
    model.load_state_dict(out, strict=True)
    with torch.no_grad():
        logits = model(make_input(**meta["input"]))
    torch.testing.assert_close(logits, load_logits(fixture), atol=1e-8, rtol=1e-8)
    tables = torch.load(fixture / "resized_tables.pt", weights_only=True)
    assert len(tables) == 7
    for k, ref in tables.items():
        torch.testing.assert_close(out[vil._official_to_ours(k)], ref, atol=1e-12, rtol=0)
    # bicubic is selectable and differs
    bic = vil.checkpoint_filter_fn(sd, model, interpolation="bicubic")
    k = vil._official_to_ours("layer3.1.attn.local_relative_position_bias_table")
    assert bic[k].shape == out[k].shape and (bic[k] - out[k]).abs().max() > 1e-4


LISTING_MODELS = {
    "vil_tiny": "vil_tiny_rpb_224", "vil_small": "vil_small_rpb_224", "vil_small_ape": "vil_small_ape_224",
    "vil_medium_deep": "vil_medium_rpb_224", "vil_base_deep": "vil_base_rpb_224",
    "vil_medium_deep_384_f6f8": "vil_medium_rpb_384", "vil_base_deep_384": "vil_base_rpb_384",
    "vil_medium_deep_in22k": "vil_medium_rpb_224",
}


@pytest.mark.parametrize("listing", sorted(LISTING_MODELS))
def test_release_listing_loads_strictly(listing):
    rows = read_listing(LISTINGS / f"{listing}.tsv")
    sd = {k: torch.zeros(s) for k, s, dt, alias in rows if dt.startswith("float")}   # aliases included
    num_classes = sd["head.weight"].shape[0]
    model = meta_model(LISTING_MODELS[listing], num_classes=num_classes)  # no init cost; shapes still checked
    out = vil.checkpoint_filter_fn(sd, model)
    res = model.load_state_dict(out, strict=True, assign=True)
    assert not res.missing_keys and not res.unexpected_keys
    # every non-alias, non-index, non-empty release tensor is consumed exactly once
    used = [k for k, s, dt, alias in rows if dt.startswith("float") and not alias and 0 not in s]
    assert len(used) == len(out)
    assert count_params(model) == sum(torch.Size(s).numel() for k, s, dt, alias in rows
                                      if dt.startswith("float") and not alias)


def test_filter_unwraps_and_pretrained_file(tmp_path):
    sd = make_state_dict(read_listing(LISTINGS / "vil_tiny.tsv"), 0)
    wrapped = {"model": {"module." + k: v.float() for k, v in sd.items()}, "epoch": 3}
    path = tmp_path / "vil_tiny.pth"
    torch.save(wrapped, path)
    m = timm.create_model("vil_tiny_rpb_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(m.stages[0].blocks[0].attn.query.weight, sd["layer1.1.attn.query.weight"].float())
    torch.testing.assert_close(m.head.bias, sd["head.bias"].float())
    for wk in ("state_dict", "model_ema", "module"):
        out = vil.checkpoint_filter_fn({wk: sd}, m)
        assert m.load_state_dict(out, strict=True)
    bad = dict(sd)
    bad["layer1.1.attn.query_global.weight"] = bad["layer1.1.attn.query.weight"] + 1
    with pytest.raises(ValueError, match="sharew"):
        vil.checkpoint_filter_fn(bad, m)


def test_ape_resize_224_to_384():
    sd = make_state_dict(read_listing(LISTINGS / "vil_small_ape.tsv"), 0)
    m = timm.create_model("vil_small_ape_384")
    out = vil.checkpoint_filter_fn(sd, m)
    m.load_state_dict(out, strict=True)
    x = out["stages.0.patch_embed.x_pos_embed"]
    assert x.shape == (1, 96, 48)
    ref = torch.nn.functional.interpolate(sd["layer1.0.x_pos_embed"].transpose(1, 2).unsqueeze(-1), size=(96, 1),
                                          mode="bilinear", align_corners=False).squeeze(-1).transpose(1, 2)
    torch.testing.assert_close(x, ref)


# counts on the meta device (no compute)
PARAMS = {"tiny": (6.720, 6.707), "small": (24.657, 24.636), "medium": (39.782, 39.721), "base": (55.801, 55.696)}
MACS_224 = {"tiny": 1.419, "small": 5.191, "medium": 9.213, "base": 14.232}


@pytest.mark.parametrize("size", list(PARAMS))
def test_params_and_macs(size):
    with torch.device("meta"):
        rpb = timm.create_model(f"vil_{size}_rpb_224")
        ape = timm.create_model(f"vil_{size}_ape_224")
    assert round(count_params(rpb) / 1e6, 3) == PARAMS[size][0]
    assert round(count_params(ape) / 1e6, 3) == PARAMS[size][1]
    for m in (rpb, ape):
        assert count_macs(m, 224) / 1e9 == pytest.approx(MACS_224[size], rel=0.01)


def test_exact_small_and_base_params_and_384_macs():
    with torch.device("meta"):
        assert count_params(timm.create_model("vil_small_rpb_224")) == 24_657_328
        assert count_params(timm.create_model("vil_base_rpb_224")) == 55_801_384
        base384 = timm.create_model("vil_base_rpb_384")
    assert round(count_params(base384) / 1e6, 3) == 56.024                  # release: Base-Deep 384 (f6,f8)
    assert count_macs(base384) / 1e9 == pytest.approx(46.71, rel=0.01)


def test_built_for_other_sizes_chunks_pad():
    """A model built for 160 (a 40x40 stage-1 map, not a multiple of the 7x7 chunks) zero-pads its chunks."""
    m = timm.create_model("vil_tiny_rpb_224", img_size=160).eval()
    assert m(torch.randn(1, 3, 160, 160)).shape == (1, 1000)
