"""What every registered backbone shares, parametrized over all five families (in the spirit of timm's
``tests/test_models.py``): registration and eval preprocessing, forward/backward, ``features_only``,
gradient checkpointing, classifier reset, parameter grouping, input-size rules.

The family files (``tests/test_<family>.py``) keep what only that family has: golden logits against the
release, checkpoint loading and resolution surgery, parameter/MAC counts, family-specific layers.
Real compute runs on the smallest variant of each family at small inputs; every variant is trained
once at its registered size (the larger ones at 384 in the slow set); shapes of every variant are checked
on the meta device.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import timm
import torch
from timm.models._manipulate import group_with_matcher
from timm.optim import param_groups_layer_decay

import models  # noqa: F401  (registers the families with timm)
from golden import meta_model
from models.measure import count_params

REDUCTIONS = [4, 8, 16, 32]


@dataclasses.dataclass(frozen=True)
class Family:
    prefix: str                      # registered names start with it
    variants: dict                   # variant -> stage-1 width (the papers' C; stages 2-4 have 2C, 4C, 8C)
    small: str                       # smallest variant: the one the real-compute tests run
    small_depth: int                 # blocks of ``small`` (layer decay must give each block its own lr scale)
    crop_pct: dict                   # input size -> crop_pct of the release's evaluation
    any_size: bool                   # runs at any multiple of 32; else built for one token grid (``img_size=``)
    bad_size: tuple                  # (H, W) refused with a ValueError ...
    bad_size_match: str              # ... whose message says this
    nwd_exact: frozenset | None = None   # model.no_weight_decay() equals this ...
    nwd_has: frozenset = frozenset()     # ... or holds these
    nwd_not: frozenset = frozenset()     # ... and not these
    final_layout: str = "nchw"       # forward_features output: nchw | nhwc | tokens | msg (one per window)
    head_hidden: int | None = None   # width the classifier reads, when not the last stage's 8C
    crop_mode_384: str = "center"

    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}{v}_{s}" for v in self.variants for s in (224, 384)]

    def width(self, name: str) -> int:
        return self.variants[name[len(self.prefix):-4]]

    def create_small(self, size: int, **kwargs):
        """The smallest variant for inputs of ``size``; ViL's tables are built for one grid (``img_size``)."""
        if not self.any_size:
            kwargs["img_size"] = size
        return timm.create_model(self.small, **kwargs)


FAMILIES = {
    "vil": Family(
        prefix="vil_", variants={f"{s}_{p}": w for s, w in (("tiny", 48), ("small", 96), ("medium", 96),
                                                            ("base", 96)) for p in ("rpb", "ape")},
        small="vil_tiny_rpb_224", small_depth=1 + 1 + 9 + 1, crop_pct={224: 0.875, 384: 0.922}, any_size=False,
        bad_size=(256, 256), bad_size_match="checkpoint_filter_fn", final_layout="tokens",
        nwd_has=frozenset({"stages.0.patch_embed.cls_token",
                           "stages.0.blocks.0.attn.local_relative_position_bias_table"}),
        nwd_not=frozenset({"stages.0.blocks.0.attn.query.weight"})),
    "msg_transformer": Family(
        prefix="msg_transformer_", variants={"tiny": 64, "small": 96, "base": 96},
        small="msg_transformer_tiny_224", small_depth=2 + 4 + 12 + 4, crop_pct={224: 0.875, 384: 1.0},
        any_size=True, bad_size=(225, 224), bad_size_match="multiples of 32", nwd_exact=frozenset({"msg_tokens"}),
        final_layout="msg"),
    "scalable_vit": Family(
        prefix="scalable_vit_", variants={"small": 64, "base": 96, "large": 128},
        small="scalable_vit_small_224", small_depth=2 + 2 + 20 + 2, crop_pct={224: 0.875, 384: 1.0},
        any_size=True, bad_size=(230, 224), bad_size_match="multiples of 32", final_layout="nhwc", head_hidden=4096,
        nwd_exact=frozenset(f"pos_block.{i}.proj.0.{p}" for i in range(4) for p in ("weight", "bias"))),
    "restv2": Family(
        prefix="restv2_", variants={"tiny": 96, "small": 96, "base": 96, "large": 128},
        small="restv2_tiny_224", small_depth=1 + 2 + 6 + 2, crop_pct={224: 1.0, 384: 1.0}, any_size=True,
        bad_size=(230, 224), bad_size_match="multiples of 32", nwd_exact=frozenset(),
        crop_mode_384="squash"),   # the release warps to 384x384 without a crop
    "ms_mlp": Family(
        prefix="ms_mlp_", variants={"tiny": 96, "small": 96, "base": 128},
        small="ms_mlp_tiny_224", small_depth=3 + 3 + 9 + 3, crop_pct={224: 0.875, 384: 1.0}, any_size=True,
        bad_size=(224, 200), bad_size_match="multiples of 32", nwd_exact=frozenset()),
}
FAMILY_IDS = list(FAMILIES)
SMALL = 96   # input side of the real-compute API tests: MSG needs 4x4 stage-1 windows (its shuffle regions)
ALL_NAMES = [(f, n) for f, fam in FAMILIES.items() for n in fam.names]
ANY_SIZE = [f for f, fam in FAMILIES.items() if fam.any_size]


def _channels(width: int) -> list[int]:
    return [width * 2 ** i for i in range(4)]


# ---- registration ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_IDS)
def test_registered_with_release_eval_preprocessing(family):
    fam = FAMILIES[family]
    assert sorted(timm.list_models(f"{fam.prefix}*")) == sorted(fam.names)
    for name in fam.names:
        cfg = timm.get_pretrained_cfg(name)
        size = int(name[-3:])
        assert cfg.num_classes == 1000 and cfg.input_size == (3, size, size)
        assert cfg.interpolation == "bicubic" and cfg.crop_pct == fam.crop_pct[size]
        assert cfg.crop_mode == (fam.crop_mode_384 if size == 384 else "center")


# ---- build, forward, backward ---------------------------------------------------------------------------

def _train_case(family: str, name: str):
    """Larger variants at 384 are the long part of this matrix (about 65 s on a 2-core EPYC): they run
    in the slow set; the default set trains every variant at 224 and each family's smallest at 384."""
    if name.endswith("_384") and name != FAMILIES[family].small.replace("_224", "_384"):
        return pytest.param(family, name, id=name, marks=pytest.mark.slow)
    return pytest.param(family, name, id=name)


@pytest.mark.parametrize("family,name", [_train_case(f, n) for f, n in ALL_NAMES])
def test_every_variant_trains_at_its_size(family, name):
    """Each registered variant, built with stochastic depth, trains one step at its registered size and
    every parameter receives a gradient (nothing is built and then left out of the graph).

    Families without position tables register the same network twice (only the eval cfg differs): their
    ``*_384`` model trains at 384, their ``*_224`` one at 224."""
    model = timm.create_model(name, drop_path_rate=0.1)
    size = int(name[-3:])
    assert model.pretrained_cfg["input_size"][-1] == size
    model.train()
    out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1000)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("family", ANY_SIZE)
@pytest.mark.parametrize("which,hw", [("224", (256, 256)), ("384", (160, 160)), ("224", (160, 288))],
                         ids=["224@256", "384@160", "224@160x288"])
def test_other_input_sizes_pad(family, which, hw):
    """Families without position tables run any multiple of 32, padding windows where needed."""
    model = timm.create_model(FAMILIES[family].small.replace("_224", f"_{which}"), num_classes=10).eval()
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None


BAD_SIZE_CASES = [(f, FAMILIES[f].small) for f in FAMILY_IDS] + [("vil", "vil_tiny_ape_224")]


@pytest.mark.parametrize("family,name", BAD_SIZE_CASES, ids=[n for _, n in BAD_SIZE_CASES])
def test_bad_input_size_is_a_clear_error(family, name):
    fam = FAMILIES[family]
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match=fam.bad_size_match):
        model(torch.randn(1, 3, *fam.bad_size))


def _final_shape(layout: str, h: int, w: int, c: int) -> tuple:
    gh, gw = h // 32, w // 32
    return {"nchw": (1, c, gh, gw), "nhwc": (1, gh, gw, c), "tokens": (1, gh * gw, c),
            "msg": (1, -(-gh // 7), -(-gw // 7), c)}[layout]          # MSG: one token per 7x7 window


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_forward_features_layout(family):
    """forward_features' output layout (what forward_head pools) at 224 and, where allowed, other sizes."""
    fam = FAMILIES[family]
    model = meta_model(fam.small)
    c = 8 * fam.width(fam.small)
    with torch.device("meta"):
        for h, w in ((224, 224), (256, 256), (256, 320)) if fam.any_size else ((224, 224),):
            assert tuple(model.forward_features(torch.empty(1, 3, h, w)).shape) == _final_shape(
                fam.final_layout, h, w, c)


# ---- dense features -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,name", ALL_NAMES, ids=[n for _, n in ALL_NAMES])
def test_features_only_every_variant_on_meta(family, name):
    """feature_info and NCHW map shapes of every variant at its registered size (meta device: no compute)."""
    fam = FAMILIES[family]
    model = meta_model(name, features_only=True)
    channels = _channels(fam.width(name))
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == REDUCTIONS
    size = int(name[-3:])
    with torch.device("meta"):
        feats = model(torch.empty(2, 3, size, size))
    assert [tuple(f.shape) for f in feats] == [(2, c, size // r, size // r) for c, r in zip(channels, REDUCTIONS)]


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_features_only_nchw(family):
    """Real NCHW maps of the smallest variant at 224 and, where the family allows, at a non-tiling 320x480."""
    fam = FAMILIES[family]
    model = timm.create_model(fam.small, features_only=True).eval()
    channels = _channels(fam.width(fam.small))
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == REDUCTIONS
    with torch.no_grad():
        for h, w in ((224, 224), (320, 480)) if fam.any_size else ((224, 224),):
            feats = model(torch.randn(1, 3, h, w))
            assert [tuple(f.shape) for f in feats] == [(1, c, h // r, w // r) for c, r in zip(channels, REDUCTIONS)]
            assert all(torch.isfinite(f).all() for f in feats)


# ---- timm API -------------------------------------------------------------------------------------------

def _count_calls(model) -> list:
    """Counts forward calls of every Linear/Conv2d (a recomputing checkpoint calls them again in backward)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_grad_checkpointing_same_outputs_and_gradients(family):
    torch.manual_seed(0)
    model = FAMILIES[family].create_small(SMALL, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, SMALL, SMALL)
    calls = _count_calls(model)

    def step():
        model.zero_grad(set_to_none=True)
        calls[0] = 0
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls[0]

    model.train()
    ref, ref_grads, ref_calls = step()
    model.set_grad_checkpointing(True)
    out, grads, ckpt_calls = step()
    assert ckpt_calls > ref_calls          # blocks really were recomputed in backward
    torch.testing.assert_close(out, ref)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], msg=n)
    model.eval()                           # and without autograd
    with torch.no_grad():
        model.set_grad_checkpointing(False)
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_classifier_reset_and_pre_logits(family):
    fam = FAMILIES[family]
    model = fam.create_small(SMALL, num_classes=10).eval()
    assert model.get_submodule(model.pretrained_cfg["classifier"]) is model.get_classifier()
    x = torch.randn(1, 3, SMALL, SMALL)
    hidden = model.head_hidden_size
    assert model.num_features == 8 * fam.width(fam.small)
    assert hidden == (fam.head_hidden or model.num_features)
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (1, hidden)
        head = model.pretrained_cfg["classifier"] + "."
        body = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5 and model.num_classes == 5
        assert model(x).shape == (1, 5)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        out = model(x)
        assert out.shape == (1, hidden)
        torch.testing.assert_close(out, pre)           # without a classifier the output is the pre-logits
    state = model.state_dict()                         # the rest of the model (a hidden head layer too)
    assert set(body) <= set(state)                     # is untouched
    for k, v in body.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_no_weight_decay_group_matcher_and_layer_decay(family):
    fam = FAMILIES[family]
    model = meta_model(fam.small)
    names = [n for n, _ in model.named_parameters()]
    nwd = model.no_weight_decay()
    assert set(nwd) <= set(names)
    if fam.nwd_exact is not None:
        assert nwd == fam.nwd_exact
    assert fam.nwd_has <= nwd and not fam.nwd_not & nwd
    # fine grouping: every parameter but the classifier head's is matched, one group per block at least
    matcher = model.group_matcher()
    assert "stem" in matcher and "blocks" in matcher
    layer_of = group_with_matcher(((n, None) for n in names), matcher, reverse=True)
    last = max(layer_of.values())
    assert {n for n in names if layer_of[n] == last} == {n for n in names if n.startswith("head.")}
    assert last + 1 >= fam.small_depth + 2              # stem, every block, head
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(model)
    assert len({g["lr_scale"] for g in groups}) >= fam.small_depth + 2


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_coarse_group_matcher_groups_by_stage(family):
    model = meta_model(FAMILIES[family].small)
    names = [n for n, _ in model.named_parameters()]
    layer_of = group_with_matcher(((n, None) for n in names), model.group_matcher(coarse=True), reverse=True)
    assert len(set(layer_of.values())) >= 1 + 4 + 1     # stem, one per stage, head
    last = max(layer_of.values())
    assert not any(re.search(r"\.blocks?\.|^stages\.\d+\.\d+\.", n) for n in names if layer_of[n] == last)


@pytest.mark.parametrize("name", ["msg_transformer_tiny_224", "scalable_vit_small_224"])
def test_fused_attn_switch_reaches_every_attention_and_agrees(name):
    """`fused_attn=False` (the release's explicit softmax) is threaded to every attention module and computes
    the same function as PyTorch's fused kernel; unknown constructor arguments are refused, not swallowed.
    (The two families whose attention takes the switch.)"""
    fused = timm.create_model(name, num_classes=10).double().eval()
    explicit = timm.create_model(name, num_classes=10, fused_attn=False).double().eval()
    explicit.load_state_dict(fused.state_dict())
    flags = {m.fused_attn for m in explicit.modules() if hasattr(m, "fused_attn")}
    assert flags == {False}
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), fused(x), atol=1e-10, rtol=1e-10)
    with pytest.raises(TypeError, match="fused_atn"):
        timm.create_model(name, fused_atn=False)
