"""MS-MLP: golden equivalence with the released code, released checkpoint format, counts, the mix-shift.

What every family shares (registration and eval preprocessing, forward/backward of every variant, other
input sizes, features_only, grad checkpointing, classifier, parameter groups) is in
tests/test_models_common.py."""
from __future__ import annotations

import pytest
import timm
import torch

import models.ms_mlp as ms_mlp
from golden import (assert_loads_strictly, assert_reproduces_release, golden_fixtures, load_meta, make_input,
                    meta_model)
from golden import cached_listing_state_dict as listing_state_dict
from models.measure import count_macs, count_params

VARIANTS = ("tiny", "small", "base")
PARAMS = {"tiny": 28_656_232, "small": 50_303_752, "base": 88_696_792}
MACS_224 = {"tiny": 4.44e9, "small": 8.67e9, "base": 15.33e9}
FIXTURES = golden_fixtures("msmlp_")


def test_fixtures_discovered():
    assert FIXTURES, "no msmlp_* golden fixtures found"


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_golden(fixture):
    meta = load_meta(fixture)
    assert_reproduces_release(f"ms_mlp_{meta['variant']}_{meta['input']['size']}", fixture,
                              num_classes=meta["num_classes"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_listing_loads_strictly(variant):
    sd = listing_state_dict(f"msmlp_{variant}")
    model = meta_model(f"ms_mlp_{variant}_224")
    out = assert_loads_strictly(ms_mlp.checkpoint_filter_fn, sd, model)
    assert len(out) == len(sd)
    target = model.state_dict()
    for wrapper in ("model", "module", "state_dict", "model_ema"):
        wrapped = {wrapper: {"module." + k: v for k, v in sd.items()}}
        assert set(ms_mlp.checkpoint_filter_fn(wrapped, model)) == set(target)


def test_filter_rejects_unknown_and_misshaped():
    model = meta_model("ms_mlp_tiny_224")
    sd = listing_state_dict("msmlp_tiny")
    with pytest.raises(KeyError, match="unexpected key"):
        ms_mlp.checkpoint_filter_fn({**sd, "layers.0.blocks.0.bogus": torch.zeros(1)}, model)
    bad = dict(sd)
    bad["layers.0.blocks.0.dwconv_lr.2.weight"] = torch.zeros(20, 1, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        ms_mlp.checkpoint_filter_fn(bad, model)


def test_224_to_384_is_identity():
    sd = listing_state_dict("msmlp_tiny")
    out = ms_mlp.checkpoint_filter_fn(sd, meta_model("ms_mlp_tiny_384"))
    ref = ms_mlp.checkpoint_filter_fn(sd, meta_model("ms_mlp_tiny_224"))
    assert set(out) == set(ref) and len(out) == len(sd)
    ids = {id(v) for v in sd.values()}
    for k in out:
        assert out[k] is ref[k] and id(out[k]) in ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts(variant):
    model = meta_model(f"ms_mlp_{variant}_224")
    assert count_params(model) == PARAMS[variant] == count_params(meta_model(f"ms_mlp_{variant}_384"))
    assert count_macs(model, 224) == pytest.approx(MACS_224[variant], rel=0.01)


def test_chunk_sizes_follow_torch_chunk():
    for dim in (96, 192, 384, 768, 128, 256, 512, 1024):
        assert ms_mlp._chunk_sizes(dim, 5) == [c.shape[0] for c in torch.chunk(torch.zeros(dim), 5)]


def test_mix_shift_equals_per_group_roll_conv():
    """The merged implementation computes the release's per-group roll → depth-wise conv, lr + td."""
    torch.manual_seed(0)
    for mix in ((1, 1, 3, 5, 7), (1, 7, 7, 7, 7)):
        blk = ms_mlp.MixShiftBlock(38, mix).double()
        for conv in list(blk.dwconv_lr) + list(blk.dwconv_td):
            torch.nn.init.normal_(conv.bias)
        x = torch.randn(2, 38, 9, 11, dtype=torch.float64)
        xs = torch.chunk(x, 5, 1)
        lr = torch.cat([blk.dwconv_lr[i](torch.roll(c, s, 3)) for i, (c, s) in enumerate(zip(xs, blk.shift_dist))], 1)
        td = torch.cat([blk.dwconv_td[i](torch.roll(c, s, 2)) for i, (c, s) in enumerate(zip(xs, blk.shift_dist))], 1)
        ref = (lr + td).permute(0, 2, 3, 1)
        torch.testing.assert_close(blk.mix_shift(x), ref, atol=1e-12, rtol=1e-12)  # autograd path
        with torch.no_grad():
            torch.testing.assert_close(blk.mix_shift(x), ref, atol=1e-12, rtol=1e-12)  # in-place buffers


def test_pretrained_file(tmp_path):
    sd = {k: v.float() for k, v in listing_state_dict("msmlp_tiny").items()}
    path = tmp_path / "msmlp_tiny.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)
    model = timm.create_model("ms_mlp_tiny_384", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stages[3].downsample.proj.weight, sd["layers.2.downsample.proj.weight"])
    assert torch.equal(model.stages[2].blocks[8].gamma, sd["layers.2.blocks.8.gamma"])
    assert torch.equal(model.stem.norm.bias, sd["patch_embed.norm.bias"])
    feat = timm.create_model("ms_mlp_tiny_224", pretrained=True, features_only=True,
                             pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(feat.model.stages[0].blocks[0].dwconv_td[4].weight, sd["layers.0.blocks.0.dwconv_td.4.weight"])


def test_features_match_golden_stages():
    fixture = next(f for f in FIXTURES if f.name == "msmlp_tiny_224")
    meta = load_meta(fixture)
    feats = torch.load(fixture / "features.pt", weights_only=True)
    model = timm.create_model("ms_mlp_tiny_224").double().eval()
    model.load_state_dict(ms_mlp.checkpoint_filter_fn(listing_state_dict("msmlp_tiny"), model), strict=True)
    with torch.no_grad():
        final, inter = model.forward_intermediates(make_input(**meta["input"]))
        pooled = model.forward_head(final, pre_logits=True)
    for i, f in enumerate(inter):
        torch.testing.assert_close(f[0, ::f.shape[1] // 16], feats[f"stage{i + 1}"], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(pooled, feats["head_input"], atol=1e-8, rtol=1e-8)
