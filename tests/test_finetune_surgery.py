"""pretrain.surgery: resolution surgery through each family's filter, head keep / reinit / map21k.

Every family at a tiny depth (1 block per stage): a resize to the same size is the identity, 224 -> 384
round-trips (strict load + forward), and what must be invariant is (bias values at unchanged offsets, MSG
messenger biases, ResTv2 / MS-MLP / ScalableViT untouched).
"""
import pytest
import torch
import torch.nn.functional as F

from pretrain.surgery import SurgeryError, adapt_state_dict, adapt_state_dict_with_report, head_row_index
from finetune_testlib import TINY, tiny

FAMILIES = ["vil", "vil_ape", "msg", "scalable_vit", "restv2", "ms_mlp"]


def _pair(fam, seed_a=0, seed_b=1, dst=None, **extra):
    a, b, kw = TINY[fam]
    torch.manual_seed(seed_a)
    src = tiny(a, **kw, **extra)
    torch.manual_seed(seed_b)
    dst_model = tiny(dst or b, **kw, **extra)
    return src, dst_model


@pytest.mark.parametrize("fam", FAMILIES)
def test_same_size_is_identity(fam):
    src, dst = _pair(fam, dst=TINY[fam][0])
    ref = src.state_dict()
    for interp in (None, "bilinear", "bicubic"):
        out = adapt_state_dict(ref, dst, bias_interp=interp)
        assert list(out) == list(dst.state_dict())
        for k, v in out.items():
            assert torch.equal(v, ref[k]), (fam, interp, k)


@pytest.mark.parametrize("fam", FAMILIES)
def test_224_to_384_roundtrip(fam):
    src, dst = _pair(fam)
    ref = src.state_dict()
    out, rep = adapt_state_dict_with_report(ref, dst)
    dst.load_state_dict(out, strict=True)
    with torch.no_grad():
        y = dst(torch.randn(1, 3, 384, 384))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    changed = {k for k in ref if k in out and out[k].shape != ref[k].shape}
    assert changed == set(rep["resized"])
    for k in ref:  # every tensor whose shape is kept is kept bit for bit
        if k in out and k not in changed:
            assert torch.equal(out[k], ref[k]), k
    if fam in ("restv2", "ms_mlp", "scalable_vit"):
        # nothing to resize (ResTv2 / MS-MLP: no position tables; ScalableViT: only the window changes)
        assert rep["resized"] == [] and set(out) == set(ref)
    elif fam == "vil":
        assert all(k.endswith("local_relative_position_bias_table") for k in changed) and len(changed) == 4
    elif fam == "vil_ape":
        assert all(k.endswith(("x_pos_embed", "y_pos_embed")) for k in changed) and changed
    elif fam == "msg":
        assert all(k.endswith("relative_position_bias_table") for k in changed) and len(changed) == 4
        for k in ref:  # messenger-token biases and tokens do not depend on the window
            if "msg" in k:
                assert torch.equal(out[k], ref[k]), k


def _center(table):
    side = int(table.shape[0] ** 0.5)
    return table.reshape(side, side, -1)[side // 2, side // 2]


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_vil_tables(interp):
    """ViL 224 -> 384 with the 224 windows: local tables untouched, full-attention tables stretched
    (exactly F.interpolate(mode) with align_corners=False, the release), zero offset kept exactly."""
    torch.manual_seed(0)
    src = tiny("vil_tiny_rpb_224", **TINY["vil"][2])
    dst = tiny("vil_tiny_rpb_224", img_size=384, **TINY["vil"][2])
    ref = src.state_dict()
    out, rep = adapt_state_dict_with_report(ref, dst, bias_interp=interp)
    assert rep["bias_interp"] == interp
    dst.load_state_dict(out, strict=True)
    local = [k for k in ref if k.startswith(("stages.0.", "stages.1.")) and k.endswith("bias_table")]
    full = [k for k in ref if k.startswith(("stages.2.", "stages.3.")) and k.endswith("bias_table")]
    assert local and full and sorted(rep["resized"]) == sorted(full)
    for k in local:
        assert torch.equal(out[k], ref[k])
    for k in full:
        t, n_old, n_new = ref[k], int(ref[k].shape[0] ** 0.5), int(out[k].shape[0] ** 0.5)
        assert n_new > n_old
        expect = F.interpolate(t.t().reshape(1, -1, n_old, n_old), size=(n_new, n_new), mode=interp,
                               align_corners=False).reshape(-1, n_new * n_new).t()
        torch.testing.assert_close(out[k], expect, atol=1e-6, rtol=0)
        torch.testing.assert_close(_center(out[k]), _center(t), atol=1e-6, rtol=0)  # zero offset kept
    if interp == "bicubic":
        lin = adapt_state_dict(ref, dst, bias_interp="bilinear")
        assert not torch.equal(lin[full[0]], out[full[0]])
    for k in ref:  # g2l / g2g biases, global tokens, weights: unchanged
        if k not in full:
            assert torch.equal(out[k], ref[k]), k


def test_msg_default_is_bicubic_and_center_kept():
    src, dst = _pair("msg")
    ref = src.state_dict()
    out, rep = adapt_state_dict_with_report(ref, dst)
    assert rep["bias_interp"] == "bicubic"
    for k in rep["resized"]:
        assert ref[k].shape[0] == 13 * 13 and out[k].shape[0] == 23 * 23
        torch.testing.assert_close(_center(out[k]), _center(ref[k]), atol=1e-6, rtol=0)


def test_release_wrappers_are_accepted():
    src, dst = _pair("restv2", dst=TINY["restv2"][0])
    ref = src.state_dict()
    out = adapt_state_dict({"model": {"module." + k: v for k, v in ref.items()}, "epoch": 3}, dst)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_head_keep_reinit_and_errors():
    src, _ = _pair("ms_mlp")
    dst10 = tiny(TINY["ms_mlp"][0], num_classes=10, **TINY["ms_mlp"][2])
    ref = src.state_dict()
    with pytest.raises(SurgeryError, match="head=reinit"):
        adapt_state_dict(ref, dst10, head="keep")
    out = adapt_state_dict(ref, dst10, head="reinit")
    dst_sd = dst10.state_dict()
    assert torch.equal(out["head.weight"], dst_sd["head.weight"]) and out["head.weight"].shape == (10, 768)
    body = [k for k in ref if not k.startswith("head.")]
    assert all(torch.equal(out[k], ref[k]) for k in body)
    no_head = {k: v for k, v in ref.items() if not k.startswith("head.")}
    with pytest.raises(SurgeryError, match="no classifier"):
        adapt_state_dict(no_head, src, head="keep")
    with pytest.raises(SurgeryError, match="head must be"):
        adapt_state_dict(ref, src, head="first1000")
    # a headless model (features / num_classes=0) ignores the source head whatever the mode
    dst0 = tiny(TINY["ms_mlp"][0], num_classes=0, **TINY["ms_mlp"][2])
    dst0.load_state_dict(adapt_state_dict(ref, dst0, head="keep"), strict=True)


def test_map21k_logits_are_selected_21k_logits():
    from data.labels import load_label_space
    a, _, kw = TINY["restv2"]
    torch.manual_seed(0)
    m21 = tiny(a, num_classes=21842, **kw)  # the 1K-first order of Swin / ViL 22K heads
    m1k = tiny(a, num_classes=1000, **kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m21(x)
    # label-space map: in22k-ms lists the 1K synsets first, so the release's first-1000 rule is right there
    out, rep = adapt_state_dict_with_report(m21.state_dict(), m1k, head="map21k")
    assert rep["head_rows"] == 1000 and rep["head_rows_first_1k"]
    m1k.load_state_dict(out, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m1k(x), ref[:, :1000], atol=1e-5, rtol=0)
    # an explicit row list (any order) and an explicit label space give the selected logits
    rows = torch.randperm(21842, generator=torch.Generator().manual_seed(1))[:1000].tolist()
    m1k.load_state_dict(adapt_state_dict(m21.state_dict(), m1k, head="map21k", head_rows=rows), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m1k(x), ref[:, rows], atol=1e-5, rtol=0)
    ms = load_label_space("in22k-ms")
    rows2 = head_row_index(21842, 1000, ms, "in1k")
    assert rows2 == list(range(1000))
    # a 1K synset missing from the source space is an error naming it (fall11 lacks n04399382)
    with pytest.raises(ValueError, match="n04399382"):
        head_row_index(21841, 1000, "in21k-fall11", "in1k")
    with pytest.raises(SurgeryError, match="label space"):
        head_row_index(12345, 1000)


def test_map21k_fall11_order_is_not_first_1000():
    """fall11 (sorted WNIDs) is not 1K-first: the rows come from the synset map, not [:1000]."""
    from data.labels import load_label_space, map_21k_to_1k
    fall11, in1k = load_label_space("in21k-fall11"), load_label_space("in1k")
    present = [s for s in in1k.synsets if s in fall11]
    sub = type(in1k)("in1k-sub", present)
    rows = head_row_index(len(fall11), len(sub), fall11, sub)
    assert rows == map_21k_to_1k(fall11, sub) and rows != list(range(len(sub)))
    assert [fall11.synsets[r] for r in rows] == present


def test_map21k_missing_synsets_for_finetuning():
    """fall11 lacks the 1K synset n04399382: an error by default (evaluation), a fresh row with
    map21k_missing='init' (finetuning: load_init_weights uses it), every other row the synset's row."""
    from data.labels import load_label_space
    a, _, kw = TINY["restv2"]
    m1k = tiny(a, num_classes=1000, **kw)
    fall11, in1k = load_label_space("in21k-fall11"), load_label_space("in1k")
    sd = dict(m1k.state_dict())
    g = torch.Generator().manual_seed(0)
    sd["head.weight"] = torch.randn(len(fall11), sd["head.weight"].shape[1], generator=g)
    sd["head.bias"] = torch.randn(len(fall11), generator=g)
    with pytest.raises(ValueError, match="n04399382"):
        adapt_state_dict(sd, m1k, head="map21k")
    out, rep = adapt_state_dict_with_report(sd, m1k, head="map21k", map21k_missing="init")
    assert rep["head_rows_fresh"] == ["n04399382"]
    miss = in1k.index("n04399382")
    assert torch.equal(out["head.weight"][miss], m1k.state_dict()["head.weight"][miss])
    for i in (0, 500, 999):
        if i != miss:
            assert torch.equal(out["head.weight"][i], sd["head.weight"][fall11.index(in1k.synsets[i])])
            assert out["head.bias"][i] == sd["head.bias"][fall11.index(in1k.synsets[i])]
    m1k.load_state_dict(out, strict=True)
