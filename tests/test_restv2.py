"""ResTv2: golden equivalence with the released code, released checkpoint formats, counts, detection norms.

What every family shares (registration and eval preprocessing, forward/backward of every variant, other
input sizes, features_only, grad checkpointing, classifier, parameter groups) is in
tests/test_models_common.py."""
from __future__ import annotations

import pytest
import timm
import torch

import models.restv2 as restv2
from golden import (assert_loads_strictly, assert_reproduces_release, golden_fixtures, load_meta, make_input,
                    meta_model)
from golden import cached_listing_state_dict as listing_state_dict
from models.measure import count_macs, count_params

VARIANTS = ("tiny", "small", "base", "large")
PARAMS = {"tiny": 30_434_776, "small": 41_205_976, "base": 55_965_208, "large": 86_532_520}
MACS_224 = {"tiny": 4.08e9, "small": 5.95e9, "base": 7.86e9, "large": 13.80e9}
MACS_384 = {"tiny": 12.63e9, "small": 18.38e9, "base": 24.25e9, "large": 42.29e9}

FIXTURES = golden_fixtures("restv2_")


def test_fixtures_discovered():
    assert FIXTURES, "no restv2_* golden fixtures found"


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_golden(fixture):
    meta = load_meta(fixture)
    assert_reproduces_release(f"restv2_{meta['variant']}_{meta['input']['size']}", fixture,
                              num_classes=meta["num_classes"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_listing_loads_strictly(variant):
    """Every released key is consumed, with its shape, and nothing of the model is left out."""
    sd = listing_state_dict(f"restv2_{variant}")
    model = meta_model(f"restv2_{variant}_224")
    assert_loads_strictly(restv2.checkpoint_filter_fn, sd, model)
    target = model.state_dict()
    # wrapper keys and the DDP prefix
    for wrapper in ("model", "module", "state_dict", "model_ema"):
        wrapped = {wrapper: {"module." + k: v for k, v in sd.items()}}
        assert set(restv2.checkpoint_filter_fn(wrapped, model)) == set(target)


def test_filter_rejects_unknown_and_misshaped():
    model = meta_model("restv2_tiny_224")
    sd = listing_state_dict("restv2_tiny")
    with pytest.raises(KeyError, match="unexpected key"):
        restv2.checkpoint_filter_fn({**sd, "stage1.0.attn.bogus": torch.zeros(1)}, model)
    bad = dict(sd)
    bad["stage1.0.attn.q.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        restv2.checkpoint_filter_fn(bad, model)


def test_224_to_384_is_identity():
    sd = listing_state_dict("restv2_tiny")
    out = restv2.checkpoint_filter_fn(sd, meta_model("restv2_tiny_384"))
    ref = restv2.checkpoint_filter_fn(sd, meta_model("restv2_tiny_224"))
    assert set(out) == set(ref)
    # every released tensor arrives unchanged (the very same tensor), exactly as for the 224 model
    ids = {id(v) for v in sd.values()}
    assert {id(v) for v in out.values()} >= ids
    for k in out:
        if id(out[k]) in ids:
            assert out[k] is ref[k]
        else:
            assert k.endswith("num_batches_tracked")


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts(variant):
    model = meta_model(f"restv2_{variant}_224")
    assert count_params(model) == PARAMS[variant] == count_params(meta_model(f"restv2_{variant}_384"))
    assert count_macs(model, 224) == pytest.approx(MACS_224[variant], rel=0.01)
    assert count_macs(model, 384) == pytest.approx(MACS_384[variant], rel=0.002)


def test_macs_cpu_equals_meta():
    """The CPU fused attention kernel is counted (models/measure.py)."""
    cpu = timm.create_model("restv2_tiny_224")
    assert count_macs(cpu, 224) == count_macs(meta_model("restv2_tiny_224"), 224)


def test_features_only_output_norms():
    """Detection output norms exist only with features_only; the classification norm/head are gone."""
    model = meta_model("restv2_tiny_224", features_only=True)
    n_out_norms = 2 * (96 + 192 + 384 + 768)
    assert count_params(model) == PARAMS["tiny"] - (768 * 1000 + 1000) - 2 * 768 + n_out_norms
    cls = meta_model("restv2_tiny_224")
    assert not any(k.startswith("out_norms") for k in cls.state_dict())


def test_pretrained_file_and_detection_keys(tmp_path):
    """timm's pretrained path runs checkpoint_filter_fn on a released file (wrapped, DDP-prefixed)."""
    sd = {k: v.float() for k, v in listing_state_dict("restv2_tiny").items()}
    path = tmp_path / "restv2_tiny.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    model = timm.create_model("restv2_tiny_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stages[2].blocks[5].mlp.fc2.weight, sd["stage3.5.mlp.fc2.weight"])
    assert torch.equal(model.stages[1].downsample.pos.pa_conv.bias, sd["patch_2.pos.pa_conv.bias"])
    # a classification checkpoint into a features_only model: detection norms start fresh
    feat = timm.create_model("restv2_tiny_224", pretrained=True, features_only=True,
                             pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(feat.model.stages[0].blocks[0].attn.up.weight, sd["stage1.0.attn.up.0.weight"])
    # the release's detectron2 backbone keys (norm_{i}.0.*) map onto the output norms
    det = {k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))}
    det.update({f"norm_{i}.0.weight": torch.full((c,), 2.0) for i, c in enumerate([96, 192, 384, 768], 1)})
    det.update({f"norm_{i}.0.bias": torch.zeros(c) for i, c in enumerate([96, 192, 384, 768], 1)})
    fmodel = timm.create_model("restv2_tiny_224", features_only=True).model
    fmodel.load_state_dict(restv2.checkpoint_filter_fn(det, fmodel), strict=True)
    assert torch.equal(fmodel.out_norms[3].weight, torch.full((768,), 2.0))


def test_features_match_golden_stages():
    """Raw stage outputs (forward_intermediates of the classification model) equal the release's."""
    fixture = next(f for f in FIXTURES if f.name == "restv2_tiny_224")
    meta = load_meta(fixture)
    feats = torch.load(fixture / "features.pt", weights_only=True)
    model = timm.create_model("restv2_tiny_224").double().eval()
    model.load_state_dict(restv2.checkpoint_filter_fn(listing_state_dict("restv2_tiny"), model), strict=True)
    with torch.no_grad():
        final, inter = model.forward_intermediates(make_input(**meta["input"]))
        pooled = model.forward_head(final, pre_logits=True)
    for i, f in enumerate(inter):
        torch.testing.assert_close(f[0, ::f.shape[1] // 16], feats[f"stage{i + 1}"], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(pooled, feats["head_input"], atol=1e-8, rtol=1e-8)
