"""MSG-Transformer: release equivalence (golden), checkpoint loading, counts, MSG tokens and shuffle regions.

What every family shares (forward/backward of every variant, other input sizes, features_only, grad
checkpointing, classifier, parameter groups, the fused_attn switch) is in tests/test_models_common.py."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import models.msg_transformer as msg
from golden import (assert_loads_strictly, assert_reproduces_release, golden_fixtures, listing_state_dict,
                    load_meta, meta_model)
from models.layers.rel_pos import relative_position_index, resize_rel_pos_table_2d
from models.measure import count_macs, count_params

VARIANTS = ("tiny", "small", "base")
PARAMS = {"tiny": 25_086_116, "small": 55_968_514, "base": 84_392_770}
MACS = {"tiny": 3.82e9, "small": 8.46e9, "base": 14.24e9}



# ---- numerical equivalence with the release ---------------------------------------------------------

@pytest.mark.parametrize("fixture", golden_fixtures("msg_"), ids=lambda p: p.name)
def test_golden_logits(fixture):
    meta = load_meta(fixture)
    assert_reproduces_release(f"msg_transformer_{meta['variant']}_{meta['size']}", fixture)


# ---- checkpoint loading -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_listing_loads_strictly(variant):
    sd = listing_state_dict(f"msg_{variant}")
    assert_loads_strictly(msg.checkpoint_filter_fn, sd, meta_model(f"msg_transformer_{variant}_224"))


def _with_index_buffers(sd):
    out = dict(sd)
    for k in list(sd):
        if k.endswith("relative_position_bias_table"):
            out[k.replace("relative_position_bias_table", "relative_position_index")] = relative_position_index((7, 7))
    return out


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "model_ema", "prefix", "nested"])
def test_wrapped_checkpoints(wrap):
    sd = _with_index_buffers(listing_state_dict("msg_tiny"))
    if wrap == "prefix":
        ckpt = {"module." + k: v for k, v in sd.items()}
    elif wrap == "nested":
        ckpt = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    else:
        ckpt = {wrap: sd, "optimizer": {}}
    model = meta_model("msg_transformer_tiny_224")
    model.load_state_dict(msg.checkpoint_filter_fn(ckpt, model), strict=True, assign=True)


def test_timm_pretrained_file(tmp_path):
    sd = {k: v.float() for k, v in _with_index_buffers(listing_state_dict("msg_tiny")).items()}
    path = tmp_path / "msg_tiny.pth"
    torch.save({"model": sd, "epoch": 300}, path)
    model = timm.create_model("msg_transformer_tiny_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    own = model.state_dict()
    for k, v in sd.items():
        if not k.endswith("relative_position_index"):
            assert torch.equal(own[k], v), k


def test_224_checkpoint_into_384_model():
    sd = listing_state_dict("msg_tiny")
    model = timm.create_model("msg_transformer_tiny_384", drop_path_rate=0.).eval()
    filtered = msg.checkpoint_filter_fn(sd, model)
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert filtered[key].shape == (23 * 23, 2)
    expected = F.interpolate(sd[key].t().reshape(1, 2, 13, 13), size=(23, 23), mode="bicubic",
                             align_corners=False).reshape(2, -1).t()
    torch.testing.assert_close(filtered[key], expected, atol=1e-12, rtol=0)
    assert torch.equal(filtered["layers.0.blocks.0.attn.rel_pos_msg"], sd["layers.0.blocks.0.attn.rel_pos_msg"])
    model.load_state_dict(filtered, strict=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_resize_to_same_size_is_identity():
    sd = listing_state_dict("msg_tiny")
    model = meta_model("msg_transformer_tiny_224")
    filtered = msg.checkpoint_filter_fn(sd, model)
    for k, v in sd.items():
        assert filtered[k] is v
    table = sd["layers.1.blocks.0.attn.relative_position_bias_table"]
    assert torch.equal(resize_rel_pos_table_2d(table, (13, 13), mode="bicubic"), table)


# ---- counts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_params_and_macs(variant):
    model = meta_model(f"msg_transformer_{variant}_224")
    assert count_params(model) == PARAMS[variant]
    macs = count_macs(model, 224)
    assert abs(macs / MACS[variant] - 1) < 0.01, macs
    # the 384 model differs only by the 23x23 (instead of 13x13) relative-position tables
    model384 = meta_model(f"msg_transformer_{variant}_384")
    tables = sum(m.relative_position_bias_table.shape[1] for m in model.modules()
                 if isinstance(m, msg.MSGWindowAttention))
    assert count_params(model384) == PARAMS[variant] + tables * (23 * 23 - 13 * 13)


# ---- MSG tokens ------------------------------------------------------------------------

def test_head_averages_surviving_msg_tokens():
    torch.manual_seed(0)
    model = timm.create_model("msg_transformer_tiny_224", drop_path_rate=0.).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 384, 384)
        feats = model.forward_features(x)           # 384 with window 7: stage 4 has 12x12 patches -> 2x2 windows
        assert feats.shape == (1, 2, 2, 512)
        torch.testing.assert_close(model(x), model.head(feats.mean(dim=(1, 2))))
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
        assert feats.shape == (1, 1, 1, 512)


def test_shuffle_is_the_papers_permutation():
    g, c = 4, 8
    x = torch.arange(2 * g * 3 * c, dtype=torch.float64).reshape(2, g, 3, c)
    y = msg.shuffle_msg(x)
    for i in range(g):
        expected = torch.cat([x[:, j, 0, i * c // g:(i + 1) * c // g] for j in range(g)], dim=-1)
        torch.testing.assert_close(y[:, i, 0], expected)
    torch.testing.assert_close(y[:, :, 1:], x[:, :, 1:])
    torch.testing.assert_close(msg.shuffle_msg(y), x)


# ---- dense features ------------------------------------------------------------------------------------

def test_detection_shuffle_sizes_and_intermediates_match_stages():
    model = timm.create_model("msg_transformer_tiny_224", shuffle_size=(4, 4, 8, 4), drop_path_rate=0.).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 800, 1216)
        final, inter = model.forward_intermediates(x)
        assert [f.shape[1] for f in inter] == [64, 128, 256, 512]
        assert final.shape == (1, 4, 6, 512)        # 25x38 patches -> 4x6 real windows
        assert torch.isfinite(final).all()
