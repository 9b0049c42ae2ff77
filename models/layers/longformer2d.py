"""ViL's 2-D Vision Longformer attention (sliding chunks + global tokens), two implementations.

Semantics are those of the released ``Long2DSCSelfAttention`` with ``exact=0`` (microsoft/vision-longformer,
``slidingchunk_2d.py``), which every released checkpoint uses:

* the ``nx x ny`` local token map is zero-padded at the bottom/right to multiples of the chunk size ``w``
  and cut into ``w x w`` chunks;
* a local query attends to the ``g`` global tokens and to the keys of the 3x3 chunk neighbourhood of its
  own chunk (``9 w^2`` keys). Keys in zero-padded positions or in chunks outside the map are masked;
* a global query attends to every token (global and local);
* relative position bias (RPB): local->local ``table[(dx + 2w-1)(4w-1) + (dy + 2w-1)]`` with
  ``d = q_pos - k_pos`` in tokens (x = rows), table ``[(4w-1)^2, H]``; local->global ``g2l[1]``,
  global->local ``g2l[0]``, global->global ``g2g``;
* random-shift training modes ``1..8``: a local query sees its own chunk plus one neighbour chunk, in the
  release's order ``(-1,-1),(-1,0),(-1,1),(0,-1),(0,1),(1,-1),(1,0),(1,1)``; mode ``-1`` is the own chunk
  only. Evaluation always uses the full neighbourhood (mode 0).

Implementations (same function, tested against each other forward and backward):

``dense_longformer2d_attention``
    The readable reference: builds the full ``N x N`` logits and an explicit mask. Memory is quadratic
    in tokens; only for tests and small maps.
``sliding_chunk_attention`` (default)
    Gathers, with cached indices (``index_select``), each chunk's queries and its keys/values: the
    global tokens followed by the 3x3 chunk neighbourhood (``g + 9 w^2`` keys, ``9x`` the keys in
    memory, only while the layer runs). One batched matmul per chunk gives the logits; the bias
    (relative position + local->global + an additive ``-inf`` mask that depends only on the chunk and
    the key, cached per shape) is added in place; softmax; one batched matmul with the values. Its
    backward is written by hand (a ``torch.autograd.Function``): it keeps only ``q, k, v`` and the
    probabilities, gathers the keys/values again and scatters their gradients with ``index_add``.
    Memory is linear in tokens. On CPU it avoids the release's 9 rolled einsums and SDPA (slow here
    with a float mask).
``flex_longformer2d_attention`` (``attn_impl='flex'``)
    The whole attention (global and local queries) as one ``torch.nn.attention.flex_attention`` call:
    a ``mask_mod`` (global rows/columns, chunk neighbourhood) compiled into a block-sparse ``BlockMask``
    and a ``score_mod`` that adds the bias. The fused kernel never materialises the logits (memory
    linear in tokens) when flex_attention is compiled, which this function does itself unless it is
    already under ``torch.compile``. What torch 2.13 runs where:

    * CUDA: fused forward and backward (training);
    * CPU, float32/bfloat16/float16, no gradients: fused forward (inference, the compiled C++ kernel);
    * CPU, float64: torch's unfused eager path (it materialises the logits: for checks only);
    * CPU with gradients: torch 2.13 has no FlexAttention backward on CPU and refuses such inputs; this
      function raises a ``NotImplementedError`` that says so (use ``attn_impl='chunk'`` to train on CPU).
      The tests compare forward and gradients on CPU by bypassing that input check, so that torch's
      eager autograd of the same ``score_mod``/``mask_mod`` runs.
"""
from __future__ import annotations

from functools import lru_cache

import torch

__all__ = [
    "CHUNK_OFFSETS", "mode_chunks", "local_relative_position_index", "chunk_key_mask", "chunk_layout",
    "sliding_chunk_attention", "dense_longformer2d_attention", "flex_longformer2d_attention",
    "valid_local_pairs",
]

# chunk neighbourhood in the release's order: chunk id c = 3 * (dx + 1) + (dy + 1)
CHUNK_OFFSETS = tuple((dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1))


def mode_chunks(mode: int) -> tuple[int, ...]:
    """Chunk ids (into :data:`CHUNK_OFFSETS`) a local query sees in release mode ``mode``."""
    if mode == 0:
        return tuple(range(9))
    if mode == -1:
        return (4,)
    if 1 <= mode <= 8:
        return (4, mode if mode > 4 else mode - 1)
    raise ValueError(f"ViL attention mode must be in -1..8, got {mode}")


@lru_cache(maxsize=None)
def local_relative_position_index(w: int, chunks: tuple[int, ...] = tuple(range(9))) -> torch.Tensor:
    """``[w^2, len(chunks) * w^2]`` index into the ``(4w-1)^2`` table (the release's buffer for mode 0).

    Query ``l`` is at ``(l // w, l % w)`` in its chunk; key ``t`` of chunk ``c`` at
    ``(w * dx_c + t // w, w * dy_c + t % w)``.
    """
    ar = torch.arange(w * w, device="cpu")
    qx, qy = ar // w, ar % w
    idx = []
    for c in chunks:
        dx, dy = CHUNK_OFFSETS[c]
        kx, ky = dx * w + ar // w, dy * w + ar % w
        rx = qx[:, None] - kx[None, :] + 2 * w - 1
        ry = qy[:, None] - ky[None, :] + 2 * w - 1
        idx.append(rx * (4 * w - 1) + ry)
    return torch.cat(idx, dim=1)


@lru_cache(maxsize=64)
def _chunk_key_mask(nx: int, ny: int, w: int, chunks: tuple[int, ...], device: str) -> torch.Tensor:
    mx, my = -(-nx // w), -(-ny // w)
    cx = torch.arange(mx, device="cpu").view(mx, 1, 1, 1)
    cy = torch.arange(my, device="cpu").view(1, my, 1, 1)
    t = torch.arange(w * w, device="cpu")
    off = torch.tensor([CHUNK_OFFSETS[c] for c in chunks], device="cpu")
    kx = (cx + off[:, 0].view(1, 1, -1, 1)) * w + (t // w).view(1, 1, 1, -1)   # [mx, 1, nc, w2]
    ky = (cy + off[:, 1].view(1, 1, -1, 1)) * w + (t % w).view(1, 1, 1, -1)    # [1, my, nc, w2]
    valid = (kx >= 0) & (kx < nx) & (ky >= 0) & (ky < ny)                        # [mx, my, nc, w2]
    return valid.reshape(mx * my, len(chunks) * w * w).to(device)


def chunk_key_mask(nx: int, ny: int, w: int, chunks: tuple[int, ...] = tuple(range(9)),
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[num_chunks, len(chunks) * w^2]``: True where the key of chunk neighbourhood is a real token.

    It does not depend on the query's position inside its chunk (release ``exact=0``).
    """
    return _chunk_key_mask(nx, ny, w, tuple(chunks), str(device))


def valid_local_pairs(nx: int, ny: int, w: int) -> int:
    """Number of (real local query, real local key) pairs of the full neighbourhood (for MAC counting)."""
    mx, my = -(-nx // w), -(-ny // w)
    keys = chunk_key_mask(nx, ny, w).sum(1).view(mx, my)                        # valid keys per chunk
    qx = torch.clamp(nx - torch.arange(mx, device="cpu") * w, max=w)                          # real query rows per chunk
    qy = torch.clamp(ny - torch.arange(my, device="cpu") * w, max=w)
    return int((keys * qx[:, None] * qy[None, :]).sum())


@lru_cache(maxsize=64)
def _chunk_indices(nx: int, ny: int, w: int, g: int, chunks: tuple[int, ...], device: str):
    """Cached gather indices of the chunked layout.

    Returns ``(q_idx [nch*w2], kv_idx [nch*(g+K)], inv_idx [nx*ny], valid [nch, g+K])``: local-token index
    of every chunk query slot (0 for padding), token index (global first) of every key slot of every chunk
    (0 where masked), position of every local token in the chunked query layout, and key validity.
    """
    mx, my = -(-nx // w), -(-ny // w)
    t = torch.arange(w * w, device="cpu")
    cx = torch.arange(mx, device="cpu").view(mx, 1, 1)
    cy = torch.arange(my, device="cpu").view(1, my, 1)
    qx, qy = cx * w + (t // w).view(1, 1, -1), cy * w + (t % w).view(1, 1, -1)       # [mx, my, w2]
    qv = (qx < nx) & (qy < ny)
    q_idx = torch.where(qv, qx * ny + qy, torch.zeros_like(qx)).reshape(-1)
    valid = chunk_key_mask(nx, ny, w, chunks).view(mx, my, len(chunks), w * w)
    off = torch.tensor([CHUNK_OFFSETS[c] for c in chunks], device="cpu")
    kx = (cx.unsqueeze(-1) + off[:, 0].view(1, 1, -1, 1)) * w + (t // w).view(1, 1, 1, -1)
    ky = (cy.unsqueeze(-1) + off[:, 1].view(1, 1, -1, 1)) * w + (t % w).view(1, 1, 1, -1)
    k_idx = torch.where(valid, g + kx * ny + ky, torch.zeros_like(kx)).view(mx * my, -1)
    valid = valid.view(mx * my, -1)
    if g:
        k_idx = torch.cat([torch.arange(g, device="cpu").expand(mx * my, g), k_idx], dim=1)
        valid = torch.cat([torch.ones(mx * my, g, dtype=torch.bool, device="cpu"), valid], dim=1)
    pos = torch.arange(nx * ny, device="cpu")
    px, py = pos // ny, pos % ny
    inv_idx = ((px // w) * my + (py // w)) * (w * w) + (px % w) * w + (py % w)
    return (q_idx.to(device), k_idx.reshape(-1).to(device), inv_idx.to(device), valid.to(device))


@lru_cache(maxsize=64)
def _additive_mask(nx, ny, w, g, chunks, device, dtype):
    valid = _chunk_indices(nx, ny, w, g, chunks, str(device))[3]
    return torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(~valid, float("-inf"))


def chunk_layout(nx: int, ny: int, w: int, num_global: int, mode: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """``(q_idx, k_idx, inv_idx, mask)`` of :func:`sliding_chunk_attention` for one grid and mode (copies).

    A module that knows its grid registers them as non-persistent buffers and passes them in as
    ``layout``: under ``torch.compile`` Dynamo ignores ``lru_cache`` and would otherwise trace the
    builders into the graph, rebuilding the indices in every layer and every step.
    """
    chunks = mode_chunks(mode)
    q_idx, k_idx, inv_idx, _ = _chunk_indices(nx, ny, w, num_global, chunks, str(device))
    mask = _additive_mask(nx, ny, w, num_global, chunks, torch.device(device), dtype)
    return q_idx.clone(), k_idx.clone(), inv_idx.clone(), mask.clone()


def _regather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(2, idx)`` for :class:`_ChunkAttention`'s backward, gathered from an unsqueezed view.

    Same values and cost in eager. Under ``torch.compile`` AOTAutograd's common-subexpression pass would
    merge a backward ``t.index_select(2, idx)`` with the forward's identical gather, and the partitioner
    (which does not recompute gathers) would then save the gathered ``g + 9 w^2`` keys/values of every
    chunk: ViL-S compiled trained with 1,262 MiB instead of eager's 961 at batch 8, 224. A gather of a
    different view is a different expression, so the forward's gathers stay forward-only.
    """
    return t.unsqueeze(0).index_select(3, idx).squeeze(0)


class _ChunkAttention(torch.autograd.Function):
    """Chunked softmax attention whose backward re-gathers the keys/values instead of saving them.

    Autograd would save the gathered ``g + 9 w^2`` keys and values of every chunk (18x the token
    tensor per layer) for the backward; this function saves the ungathered ``q, k, v`` (which the block
    keeps alive anyway) and the probabilities, and gathers again in the backward (the release's
    hand-written backward makes the same trade). Same numerics as the autograd version.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, q_idx, k_idx, inv_idx, scale, w2):
        b, h, _, m = q.shape
        nch = q_idx.numel() // w2
        kn = k_idx.numel() // nch
        qc = q.index_select(2, q_idx).view(b, h, nch, w2, m).mul_(scale)
        attn = torch.matmul(qc, k.index_select(2, k_idx).view(b, h, nch, kn, m).transpose(-1, -2))
        del qc
        p = attn.add_(bias).softmax(dim=-1)                                       # [B, H, nch, w2, K]
        del attn
        out = torch.matmul(p, v.index_select(2, k_idx).view(b, h, nch, kn, m))
        ctx.save_for_backward(q, k, v, p, q_idx, k_idx, inv_idx)
        ctx.scale, ctx.shape = scale, (b, h, nch, w2, kn, m)
        ctx.bias_shape = bias.shape
        return out.view(b, h, nch * w2, m).index_select(2, inv_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, p, q_idx, k_idx, inv_idx = ctx.saved_tensors
        b, h, nch, w2, kn, m = ctx.shape
        go = grad_out.new_zeros(b, h, nch * w2, m).index_copy_(2, inv_idx, grad_out).view(b, h, nch, w2, m)
        dp = torch.matmul(go, _regather(v, k_idx).view(b, h, nch, kn, m).transpose(-1, -2))
        dv = None
        if ctx.needs_input_grad[2]:
            dvc = torch.matmul(p.transpose(-1, -2), go).view(b, h, nch * kn, m)
            dv = v.new_zeros(v.shape).index_add_(2, k_idx, dvc)
            del dvc
        del go
        # softmax backward in place: ds = p * (dp - sum(p * dp)); zero where p is (masked keys, padded rows)
        dp.mul_(p)
        ds = dp.addcmul_(p, dp.sum(-1, keepdim=True), value=-1)
        del dp
        dbias = None
        if ctx.needs_input_grad[3]:
            dbias = ds.sum(0, keepdim=len(ctx.bias_shape) == 5)
            dbias = dbias.sum_to_size(ctx.bias_shape)
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dqc = torch.matmul(ds, _regather(k, k_idx).view(b, h, nch, kn, m)).mul_(ctx.scale)
            dq = dqc.view(b, h, nch * w2, m).index_select(2, inv_idx)
            del dqc
        if ctx.needs_input_grad[1]:
            qc = _regather(q, q_idx).view(b, h, nch, w2, m)
            dkc = torch.matmul(ds.transpose(-1, -2), qc).mul_(ctx.scale).view(b, h, nch * kn, m)
            dk = k.new_zeros(k.shape).index_add_(2, k_idx, dkc)
        return dq, dk, dv, dbias, None, None, None, None, None


def sliding_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nx: int, ny: int, w: int, num_global: int,
    scale: float, rel_bias: torch.Tensor | None = None, l2g_bias: torch.Tensor | None = None,
    mode: int = 0, layout: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Local-query part of ViL attention, memory linear in tokens.

    Every chunk's queries and its keys/values (the ``g`` global tokens, then the neighbour chunks) are
    gathered with cached indices (``index_select``), so one batched matmul covers each chunk's
    ``w^2 x (g + 9 w^2)`` logits. Keys outside the map or in zero padding point at an arbitrary token
    and are masked by an additive ``-inf`` (cached per shape); the bias (relative position +
    local->global + mask) is added in place in one pass. The backward (:class:`_ChunkAttention`)
    gathers again rather than keeping the gathered keys/values: training memory stays below the
    release's.

    Args:
        q: ``[B, H, nx*ny, M]`` local queries (unscaled).
        k, v: ``[B, H, g + nx*ny, M]`` keys/values of all tokens (global first).
        rel_bias: ``[H, w^2, 9 w^2]`` local->local bias for the full neighbourhood (release layout), or None.
        l2g_bias: ``[H, g]`` local->global bias, or None.
        mode: release mode (0 full, -1 own chunk, 1..8 own chunk + one neighbour).
        layout: :func:`chunk_layout` of this grid and mode, or None (built and cached per shape here).
    Returns:
        ``[B, H, nx*ny, M]``.
    """
    h = q.shape[1]
    g = num_global
    chunks = mode_chunks(mode)
    w2 = w * w
    if layout is None:
        q_idx, k_idx, inv_idx, _ = _chunk_indices(nx, ny, w, g, chunks, str(q.device))
        mask = _additive_mask(nx, ny, w, g, chunks, q.device, q.dtype)
    else:
        q_idx, k_idx, inv_idx, mask = layout
    nch = q_idx.numel() // w2
    kn = k_idx.numel() // nch
    mask = mask.to(q.dtype).view(1, nch, 1, kn)
    if rel_bias is not None:
        if mode != 0:
            rel_bias = torch.cat([rel_bias[..., c * w2:(c + 1) * w2] for c in chunks], dim=-1)
        if g:
            rel_bias = torch.cat([l2g_bias.to(rel_bias.dtype)[:, None, :].expand(h, w2, g), rel_bias], dim=-1)
        bias = (rel_bias.to(q.dtype).unsqueeze(1) + mask)                          # [H, nch, w2, K]
    else:
        bias = mask
    return _ChunkAttention.apply(q, k.to(q.dtype), v.to(q.dtype), bias, q_idx, k_idx, inv_idx, scale, w2)


def dense_longformer2d_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nx: int, ny: int, w: int, num_global: int,
    scale: float, table: torch.Tensor | None = None, g2l: torch.Tensor | None = None,
    g2g: torch.Tensor | None = None, mode: int = 0,
) -> torch.Tensor:
    """Readable reference of the whole ViL attention (global and local queries), quadratic memory.

    Args:
        q, k, v: ``[B, H, N, M]`` for all ``N = g + nx*ny`` tokens (global first), q unscaled.
        table: ``[(4w-1)^2, H]`` local bias table, g2l ``[2, H, g]``, g2g ``[H, g, g]`` (RPB) or None.
    Returns ``[B, H, N, M]``.
    """
    g = num_global
    n = g + nx * ny
    dev = q.device
    pos = torch.arange(nx * ny, device=dev)
    px, py = pos // ny, pos % ny
    cx, cy = px // w, py // w
    dcx = cx[None, :] - cx[:, None]                                               # key chunk - query chunk
    dcy = cy[None, :] - cy[:, None]
    allowed = {CHUNK_OFFSETS[c] for c in mode_chunks(mode)}
    keep_ll = torch.zeros(nx * ny, nx * ny, dtype=torch.bool, device=dev)
    for dx, dy in allowed:
        keep_ll |= (dcx == dx) & (dcy == dy)
    keep = torch.ones(n, n, dtype=torch.bool, device=dev)
    keep[g:, g:] = keep_ll
    bias = torch.zeros(q.shape[1], n, n, dtype=q.dtype, device=dev)
    if table is not None:
        rx = px[:, None] - px[None, :] + 2 * w - 1
        ry = py[:, None] - py[None, :] + 2 * w - 1
        idx = (rx.clamp(0, 4 * w - 2) * (4 * w - 1) + ry.clamp(0, 4 * w - 2))   # clamped where masked
        ll = table[idx.view(-1)].view(nx * ny, nx * ny, -1).permute(2, 0, 1)
        if g:
            top = torch.cat([g2g, g2l[0].unsqueeze(-1).expand(-1, -1, nx * ny)], dim=-1)
            bottom = torch.cat([g2l[1].unsqueeze(1).expand(-1, nx * ny, -1), ll], dim=-1)
            bias = torch.cat([top, bottom], dim=1)
        else:
            bias = ll
    attn = (q * scale) @ k.transpose(-1, -2) + bias
    attn = attn.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return attn @ v


# ----------------------------------------------------------------------------------------- FlexAttention

def _longformer_mask_mod(num_global: int, ny: int, w: int, mode: int):
    """``mask_mod(b, h, q_idx, kv_idx)``: global rows and columns are free, local pairs need a neighbour chunk."""
    g = num_global
    offsets = [CHUNK_OFFSETS[c] for c in mode_chunks(mode)]

    def mask_mod(b, h, q_idx, kv_idx):
        ql, kl = (q_idx - g).clamp(min=0), (kv_idx - g).clamp(min=0)
        dcx = (kl // ny) // w - (ql // ny) // w                           # key chunk - query chunk
        dcy = (kl % ny) // w - (ql % ny) // w
        if mode == 0:
            local = (dcx.abs() <= 1) & (dcy.abs() <= 1)
        else:
            local = (dcx == offsets[0][0]) & (dcy == offsets[0][1])
            for ox, oy in offsets[1:]:
                local = local | ((dcx == ox) & (dcy == oy))
        return (q_idx < g) | (kv_idx < g) | local

    return mask_mod


@lru_cache(maxsize=64)
def _flex_block_mask(nx: int, ny: int, w: int, num_global: int, mode: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask
    n = num_global + nx * ny
    return create_block_mask(_longformer_mask_mod(num_global, ny, w, mode), None, None, n, n, device=device)


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_longformer2d_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nx: int, ny: int, w: int, num_global: int,
    scale: float, table: torch.Tensor | None = None, g2l: torch.Tensor | None = None,
    g2g: torch.Tensor | None = None, mode: int = 0, block_mask=None,
) -> torch.Tensor:
    """The whole ViL attention on FlexAttention; same arguments and result as :func:`dense_longformer2d_attention`.

    ``block_mask``: the ``BlockMask`` of this shape and mode (default: built once per shape and cached);
    callers under ``torch.compile`` pass one built outside the graph so that it is not rebuilt per step.
    """
    from torch.nn.attention import flex_attention as fa

    g = num_global
    if block_mask is None:
        block_mask = _flex_block_mask(nx, ny, w, g, mode, str(q.device))
    score_mod = None
    if table is not None:
        span, side = 2 * w - 1, 4 * w - 1
        top = table.shape[0] - 1

        def add_bias(score, b, h, q_idx, kv_idx):
            ql, kl = (q_idx - g).clamp(min=0), (kv_idx - g).clamp(min=0)
            idx = ((ql // ny - kl // ny + span) * side + (ql % ny - kl % ny + span)).clamp(0, top)
            bias = table[idx, h]                                   # local -> local (clamped where masked)
            if g:
                qg, kg = q_idx.clamp(max=g - 1), kv_idx.clamp(max=g - 1)
                bias = torch.where(
                    q_idx < g,
                    torch.where(kv_idx < g, g2g[h, qg, kg], g2l[0, h, qg]),   # global query
                    torch.where(kv_idx < g, g2l[1, h, kg], bias))            # local query
            return score + bias

        score_mod = add_bias

    if torch.compiler.is_compiling():
        flex = fa.flex_attention                                   # the caller's compile fuses it
    elif q.device.type == "cpu" and q.dtype == torch.float64:
        flex = fa.flex_attention                                   # the CPU kernel has no float64: unfused
    else:
        flex = _compiled_flex_attention()
    try:
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    except NotImplementedError as e:
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise NotImplementedError(
                f"ViL attn_impl='flex' cannot compute gradients on CPU: torch {torch.__version__} has no "
                f"FlexAttention backward on CPU ({e}). Train on CPU with attn_impl='chunk' (the default); "
                f"'flex' runs inference on CPU and training on CUDA.") from e
        raise
