"""ScalableViT: release equivalence (golden), checkpoint loading, counts, IWSA padding, the two-layer head.

What every family shares (forward/backward of every variant, other input sizes, features_only, grad
checkpointing, classifier, parameter groups, the fused_attn switch) is in tests/test_models_common.py."""
from __future__ import annotations

import pytest
import timm
import torch

import models.scalable_vit as svit
from golden import (assert_loads_strictly, assert_reproduces_release, golden_fixtures, listing_state_dict,
                    load_meta, meta_model)
from models.measure import count_macs, count_params

VARIANTS = ("small", "base", "large")
PARAMS = {"small": 32_000_472, "base": 81_881_624, "large": 109_288_840}
MACS = {"small": 4.27e9, "base": 8.80e9, "large": 14.99e9}



# ---- numerical equivalence with the release ---------------------------------------------------------

@pytest.mark.parametrize("fixture", golden_fixtures("scalablevit_"), ids=lambda p: p.name)
def test_golden_logits(fixture):
    meta = load_meta(fixture)
    assert_reproduces_release(f"scalable_vit_{meta['variant']}_{meta['size']}", fixture)


# ---- checkpoint loading -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", (224, 384))
@pytest.mark.parametrize("variant", VARIANTS)
def test_listing_loads_strictly(variant, size):
    sd = listing_state_dict(f"scalablevit_{variant}")
    assert_loads_strictly(svit.checkpoint_filter_fn, sd, meta_model(f"scalable_vit_{variant}_{size}"))


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "model_ema", "prefix", "nested"])
def test_wrapped_checkpoints(wrap):
    sd = listing_state_dict("scalablevit_small")
    if wrap == "prefix":
        ckpt = {"module." + k: v for k, v in sd.items()}
    elif wrap == "nested":
        ckpt = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    else:
        ckpt = {wrap: sd, "optimizer": {}}
    model = meta_model("scalable_vit_small_224")
    model.load_state_dict(svit.checkpoint_filter_fn(ckpt, model), strict=True, assign=True)


def test_timm_pretrained_file(tmp_path):
    sd = {k: v.float() for k, v in listing_state_dict("scalablevit_small").items()}
    path = tmp_path / "scalablevit_small.pth"
    torch.save({"model": sd, "epoch": 300}, path)
    model = timm.create_model("scalable_vit_small_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_224_checkpoint_into_384_model_is_unchanged():
    sd = listing_state_dict("scalablevit_small")
    model = timm.create_model("scalable_vit_small_384", drop_path_rate=0.).eval()
    filtered = svit.checkpoint_filter_fn(sd, model)
    for k, v in sd.items():
        assert filtered[k] is v
    model.load_state_dict(filtered, strict=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ---- counts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_params_and_macs(variant):
    model = meta_model(f"scalable_vit_{variant}_224")
    assert count_params(model) == PARAMS[variant]
    assert count_params(meta_model(f"scalable_vit_{variant}_384")) == PARAMS[variant]
    macs = count_macs(model, 224)
    assert abs(macs / MACS[variant] - 1) < 0.01, macs


def test_plain_head_option():
    model = meta_model("scalable_vit_small_224", plain_head=True)
    assert isinstance(model.head, torch.nn.Linear)
    assert count_params(model) == PARAMS["small"] - (512 * 4096 + 4096 + 2 * 4096 + 4096 * 1000 + 1000) + 512 * 1000 + 1000


# ---- IWSA ------------------------------------------------------------------------

def test_iwsa_padding_crops_back():
    """A padded IWSA equals window attention on the zero-padded map (cropped) plus the LIM of the real map."""
    torch.manual_seed(0)
    attn = svit.IWSA(32, num_heads=2, qkv_bias=True, ws=7).double().eval()
    x = torch.randn(1, 10, 12, 32, dtype=torch.float64)
    out = attn(x)
    xp = torch.nn.functional.pad(x, (0, 0, 0, 2, 0, 4))             # 14 x 14 tiles
    ref_lim = attn.lim_func(attn.qkv(x)[..., 64:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ref_lim_p = attn.lim_func(attn.qkv(xp)[..., 64:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    full = attn(xp)                                                   # no padding path
    # remove the padded-map LIM and add the real-map LIM through proj's linearity
    w = attn.proj.weight
    ref = full[:, :10, :12] - ref_lim_p[:, :10, :12] @ w.t() + ref_lim @ w.t()
    torch.testing.assert_close(out, ref)


# ---- dense features ------------------------------------------------------------------------------------

def test_detection_size_features():
    model = timm.create_model("scalable_vit_small_224", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 800, 1216))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 100, 152), (1, 512, 25, 38)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_two_layer_head_classifier():
    """The release's head is Linear(C, 4096) -> LN -> GELU -> Linear: the classifier is its last layer, and a
    reset replaces only that one."""
    model = meta_model("scalable_vit_small_224")
    assert model.pretrained_cfg["classifier"] == "head.3"
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10 and model.head[0].out_features == 4096
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
