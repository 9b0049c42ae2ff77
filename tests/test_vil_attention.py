"""ViL 2-D Longformer attention: efficient sliding-chunk implementation vs the dense masked reference."""
import itertools

import pytest
import torch

from models.layers.longformer2d import (
    CHUNK_OFFSETS, chunk_key_mask, dense_longformer2d_attention, local_relative_position_index,
    mode_chunks, sliding_chunk_attention, valid_local_pairs,
)


def _inputs(b, h, m, nx, ny, w, g, rpb, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = g + nx * ny
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v = r(b, h, n, m), r(b, h, n, m), r(b, h, n, m)
    table = r((4 * w - 1) ** 2, h) if rpb else None
    g2l = r(2, h, g) if (rpb and g) else None
    g2g = r(h, g, g) if (rpb and g) else None
    return q, k, v, table, g2l, g2g


def _chunk_full(q, k, v, nx, ny, w, g, table, g2l, g2g, mode):
    """Efficient local part + plain global-query part (what LongformerAttention does)."""
    scale = q.shape[-1] ** -0.5
    h = q.shape[1]
    rel = None
    if table is not None:
        rel = table[local_relative_position_index(w).view(-1)].view(w * w, 9 * w * w, h).permute(2, 0, 1)
    out_l = sliding_chunk_attention(q[:, :, g:], k, v, nx, ny, w, g, scale, rel,
                                    None if g2l is None else g2l[1], mode=mode)
    if not g:
        return out_l
    a = (q[:, :, :g] * scale) @ k.transpose(-1, -2)
    if g2g is not None:
        a = a + torch.cat([g2g, g2l[0].unsqueeze(-1).expand(-1, -1, nx * ny)], dim=-1)
    return torch.cat([a.softmax(-1) @ v, out_l], dim=2)


CASES = [  # nx, ny, w, g, rpb
    (14, 14, 7, 1, True),     # no padding, the 224 stage-2 layout
    (10, 13, 4, 1, True),     # padding in both directions, non-square
    (9, 9, 3, 2, True),       # several global tokens
    (11, 6, 4, 0, True),      # no global token, padding
    (10, 13, 4, 1, False),    # APE model: no bias
    (5, 3, 7, 1, True),       # map smaller than a chunk
]


@pytest.mark.parametrize("nx,ny,w,g,rpb", CASES)
@pytest.mark.parametrize("mode", [0, -1, 3, 6])
def test_chunk_equals_dense_forward_backward(nx, ny, w, g, rpb, mode):
    args = _inputs(2, 2, 4, nx, ny, w, g, rpb)
    leaves = [t for t in args if t is not None]
    out_d = dense_longformer2d_attention(*args[:3], nx, ny, w, g, args[0].shape[-1] ** -0.5, *args[3:], mode=mode)
    gout = torch.randn_like(out_d)
    grads_d = torch.autograd.grad((out_d * gout).sum(), leaves)
    out_c = _chunk_full(*args[:3], nx, ny, w, g, *args[3:], mode=mode)
    grads_c = torch.autograd.grad((out_c * gout).sum(), leaves)
    torch.testing.assert_close(out_c, out_d, atol=1e-12, rtol=1e-10)
    for gc, gd in zip(grads_c, grads_d):
        torch.testing.assert_close(gc, gd, atol=1e-11, rtol=1e-10)


def test_float32_agreement():
    args = [None if t is None else t.detach().float().requires_grad_() for t in _inputs(2, 3, 8, 12, 12, 4, 1, True)]
    leaves = [t for t in args if t is not None]
    out_d = dense_longformer2d_attention(*args[:3], 12, 12, 4, 1, 8 ** -0.5, *args[3:])
    out_c = _chunk_full(*args[:3], 12, 12, 4, 1, *args[3:], mode=0)
    torch.testing.assert_close(out_c, out_d, atol=1e-5, rtol=1e-5)
    gd = torch.autograd.grad(out_d.square().sum(), leaves)
    gc = torch.autograd.grad(out_c.square().sum(), leaves)
    for a, b in zip(gc, gd):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_reference_semantics_by_brute_force():
    """The dense reference itself, entry by entry, against the release's semantics (``sw_exact=0``): key k is
    kept for query q iff their w x w chunks differ by at most 1 in x and in y, bias
    ``table[(dx + 2w - 1)(4w - 1) + (dy + 2w - 1)]``, local queries also see the global tokens (one query, one head)."""
    nx, ny, w, g = 10, 9, 4, 1
    q, k, v, table, g2l, g2g = [t.detach() if t is not None else None for t in _inputs(1, 1, 3, nx, ny, w, g, True)]
    out = dense_longformer2d_attention(q, k, v, nx, ny, w, g, 1.0, table, g2l, g2g)
    for (px, py) in [(0, 0), (9, 8), (5, 4), (8, 1)]:
        qi = g + px * ny + py
        logits, vals = [float(q[0, 0, qi] @ k[0, 0, 0]) + float(g2l[1, 0, 0])], [v[0, 0, 0]]
        for kx, ky in itertools.product(range(nx), range(ny)):
            if abs(kx // w - px // w) <= 1 and abs(ky // w - py // w) <= 1:
                ki = g + kx * ny + ky
                idx = (px - kx + 2 * w - 1) * (4 * w - 1) + (py - ky + 2 * w - 1)
                logits.append(float(q[0, 0, qi] @ k[0, 0, ki]) + float(table[idx, 0]))
                vals.append(v[0, 0, ki])
        p = torch.tensor(logits, dtype=torch.float64).softmax(0)
        torch.testing.assert_close(out[0, 0, qi], (p[:, None] * torch.stack(vals)).sum(0))


def test_release_relative_position_index_layout():
    """Matches the release buffer's construction (chunk-major, [w^2, 9w^2], x-major (4w-1) rows)."""
    w = 3
    idx = local_relative_position_index(w)
    assert idx.shape == (w * w, 9 * w * w)
    # query (0,0) vs the first key of chunk (-1,-1), at (-w,-w): d = (w, w)
    assert idx[0, 0] == (w + 2 * w - 1) * (4 * w - 1) + (w + 2 * w - 1)
    # own chunk diagonal: d = 0
    assert all(idx[l, 4 * w * w + l] == (2 * w - 1) * (4 * w - 1) + 2 * w - 1 for l in range(w * w))
    assert idx.min() >= 0 and idx.max() < (4 * w - 1) ** 2


def test_modes_and_mask():
    assert mode_chunks(0) == tuple(range(9)) and mode_chunks(-1) == (4,)
    assert mode_chunks(1) == (4, 0) and mode_chunks(4) == (4, 3) and mode_chunks(5) == (4, 5)
    assert CHUNK_OFFSETS[0] == (-1, -1) and CHUNK_OFFSETS[8] == (1, 1)
    m = chunk_key_mask(14, 14, 7)
    assert m.shape == (4, 441)
    assert int(m[0].sum()) == 4 * 49                      # corner chunk: 4 real neighbour chunks
    with pytest.raises(ValueError):
        mode_chunks(9)


@pytest.mark.parametrize("nx,ny,w", [(14, 14, 7), (10, 13, 4), (56, 56, 7), (5, 3, 7)])
def test_valid_pairs_count(nx, ny, w):
    pos = torch.arange(nx * ny)
    cx, cy = (pos // ny) // w, (pos % ny) // w
    brute = ((cx[:, None] - cx[None]).abs().le(1) & (cy[:, None] - cy[None]).abs().le(1)).sum()
    assert valid_local_pairs(nx, ny, w) == int(brute)


def test_memory_linear_in_tokens():
    """Peak memory of the efficient forward+backward grows ~linearly with tokens (dense: quadratically)."""
    from models.bench import _PeakMem
    from models.vil import LongformerAttention

    attn = LongformerAttention(16, 2, 4, 1)
    peaks = {}
    for impl, sizes in (("chunk", (16, 32)), ("dense", (16, 32))):
        attn.impl = impl
        for n in sizes:
            x = torch.randn(1, 1 + n * n, 16, requires_grad=True)
            with _PeakMem(torch.device("cpu")) as pm:
                attn(x, n, n).sum().backward()
            peaks[impl, n] = pm.peak
    ratio_chunk = peaks["chunk", 32] / peaks["chunk", 16]
    ratio_dense = peaks["dense", 32] / peaks["dense", 16]
    assert ratio_chunk < 5.5, peaks            # 4x the tokens
    assert ratio_dense > 10, peaks             # quadratic reference, shows the measurement can tell


def test_random_shift_mode_train_vs_eval():
    from models.vil import LongformerAttention
    torch.manual_seed(0)
    attn = LongformerAttention(16, 2, 4, 1).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 1 + 12 * 12, 16, dtype=torch.float64)
    attn.eval()
    full = attn(x, 12, 12)
    attn.mode = 1
    torch.testing.assert_close(attn(x, 12, 12), full)       # eval always uses the full neighbourhood
    attn.train()
    torch.manual_seed(3)
    shifted = attn(x, 12, 12)
    assert (shifted - full).abs().max() > 1e-3
    torch.manual_seed(3)
    k = int(torch.randint(1, 9, ()).item())
    attn.mode, attn.impl = k, "dense"
    attn.eval()                                              # dense in eval would be mode 0: call directly
    q = attn.query(x).view(2, -1, 2, 8).transpose(1, 2)
    kk, vv = attn.kv(x).view(2, -1, 2, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    ref = dense_longformer2d_attention(q, kk, vv, 12, 12, 4, 1, attn.scale, attn.local_relative_position_bias_table,
                                       attn.g2l_relative_position_bias, attn.g2g_relative_position_bias, mode=k)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, -1, 16))
    torch.testing.assert_close(shifted, ref)


def _saved_bytes_bound(x):
    """What one ``LongformerAttention(16, 2, 4, 1)`` layer on a 16x16 map may keep for its backward: the
    probabilities ``[B, H, chunks, w^2, g + 9 w^2]`` and 12 token-sized tensors, not the gathered keys/values."""
    b = x.shape[0]
    token_bytes = x.numel() * 4
    probs_bytes = b * 2 * 16 * 16 * (1 + 9 * 16) * 4
    return probs_bytes + 12 * token_bytes


def test_chunk_backward_saves_no_gathered_keys():
    """One layer keeps for its backward the probabilities, token-sized tensors and weights only (the hand-written
    backward gathers the ``g + 9 w^2`` keys/values of each chunk again instead of saving them: 18x tokens)."""
    from models.vil import LongformerAttention

    attn = LongformerAttention(16, 2, 4, 1)
    n, b = 16, 2
    x = torch.randn(b, 1 + n * n, 16, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x, n, n)
    assert sum(storages.values()) < _saved_bytes_bound(x), (sum(storages.values()), _saved_bytes_bound(x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compiled_chunk_backward_saves_no_gathered_keys():
    """Under torch.compile the layer saves what the eager one does: AOTAutograd's partitioner (the one inductor
    uses, here without code generation) must not keep the gathered keys/values for the backward. It did while
    the backward's gathers were the same expressions as the forward's (CSE merged them): ViL-S compiled trained
    with 1,262 MiB instead of eager's 961."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from models.vil import LongformerAttention

    n, b = 16, 2
    attn = LongformerAttention(16, 2, 4, 1, grid_size=(n, n))      # layout buffers, as in the models
    x = torch.randn(b, 1 + n * n, 16, requires_grad=True)
    saved = []

    def keep_backward_inputs(gm, _):
        saved.extend(p.meta["val"] for p in gm.graph.find_nodes(op="placeholder")
                     if isinstance(p.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=keep_backward_inputs,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    try:
        torch.compile(attn, backend=backend, fullgraph=True)(x, n, n).sum().backward()
    finally:
        torch._dynamo.reset()
    total = sum(t.numel() * t.element_size() for t in saved)
    assert saved and total < _saved_bytes_bound(x), sorted(tuple(t.shape) for t in saved)
    assert x.grad is not None and torch.isfinite(x.grad).all()
