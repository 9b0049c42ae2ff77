"""ViL attention on FlexAttention (``attn_impl='flex'``) against the default sliding-chunk implementation.

torch 2.13 has no FlexAttention backward on CPU: its ``flex_attention`` wrapper refuses CPU inputs that
require grad. To compare gradients on CPU the ``cpu_flex_backward`` fixture bypasses that input check,
so torch's own eager autograd of the same ``score_mod``/``mask_mod`` (its unfused math path, float64)
runs; the CUDA kernels are generated from the same two functions.
"""
import pytest
import timm
import torch
import torch.nn.attention.flex_attention as fa

import models  # noqa: F401
from models.layers.longformer2d import dense_longformer2d_attention, flex_longformer2d_attention
from test_vil_attention import CASES, _chunk_full, _inputs


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


@pytest.mark.parametrize("nx,ny,w,g,rpb,mode", [c + (m,) for c in CASES for m in (0, 6)] + [CASES[1] + (-1,)])
def test_flex_equals_chunk_float64_forward_backward(cpu_flex_backward, nx, ny, w, g, rpb, mode):
    args = _inputs(2, 2, 4, nx, ny, w, g, rpb, seed=1)
    leaves = [t for t in args if t is not None]
    scale = args[0].shape[-1] ** -0.5
    out_c = _chunk_full(*args[:3], nx, ny, w, g, *args[3:], mode=mode)
    gout = torch.randn_like(out_c)
    grads_c = torch.autograd.grad((out_c * gout).sum(), leaves)
    out_f = flex_longformer2d_attention(*args[:3], nx, ny, w, g, scale, *args[3:], mode=mode)
    grads_f = torch.autograd.grad((out_f * gout).sum(), leaves)
    torch.testing.assert_close(out_f, out_c, atol=1e-12, rtol=1e-10)
    for gf, gc in zip(grads_f, grads_c):           # q, k, v, bias table, g2l, g2g
        torch.testing.assert_close(gf, gc, atol=1e-11, rtol=1e-10)
    out_d = dense_longformer2d_attention(*args[:3], nx, ny, w, g, scale, *args[3:], mode=mode)
    torch.testing.assert_close(out_f, out_d, atol=1e-12, rtol=1e-10)


def test_flex_model_logits_equal_chunk_float64():
    torch.manual_seed(0)
    chunk = timm.create_model("vil_tiny_rpb_224", img_size=64).double().eval()
    flex = timm.create_model("vil_tiny_rpb_224", img_size=64, attn_impl="flex").double().eval()
    flex.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(flex(x), chunk(x), atol=1e-12, rtol=1e-10)


def test_flex_cpu_training_is_refused_clearly():
    model = timm.create_model("vil_tiny_rpb_224", img_size=64, attn_impl="flex").double()
    with pytest.raises(NotImplementedError, match="attn_impl='chunk'"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).sum().backward()


def test_unknown_attn_impl_is_refused():
    with pytest.raises(ValueError, match="unknown ViL attn_impl 'sdpa'"):
        timm.create_model("vil_tiny_rpb_224", img_size=64, attn_impl="sdpa")
    model = timm.create_model("vil_tiny_rpb_224", img_size=64)
    with pytest.raises(ValueError, match="unknown ViL attn_impl"):
        model.set_attn_impl("Flex")
    model.set_attn_impl("flex")
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"flex"}


@pytest.mark.slow
def test_flex_compiled_cpu_float32_and_linear_memory():
    """The fused CPU kernel (inference): equals the chunk path in float32 and never materialises the logits."""
    from models.bench import _PeakMem
    from models.vil import LongformerAttention

    torch.manual_seed(0)
    attn = LongformerAttention(16, 2, 4, 1).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    peaks = {}
    for n in (16, 32):
        x = torch.randn(1, 1 + n * n, 16)
        with torch.no_grad():
            attn.impl = "chunk"
            ref = attn(x, n, n)
            attn.impl = "flex"
            out = attn(x, n, n)                          # compiles once per shape
            with _PeakMem(torch.device("cpu")) as pm:
                attn(x, n, n)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        peaks[n] = pm.peak
    assert peaks[32] / peaks[16] < 5.5, peaks          # 4x the tokens; dense logits would be 16x
