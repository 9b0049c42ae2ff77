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
    Gathers each chunk's 3x3 neighbourhood of keys/values from the zero-padded map as shifted views of
    the chunk grid (one copy, ``9x`` the keys), prepends the global keys and runs one batched attention
    per chunk. The mask (which depends only on the chunk and the key, not on the query inside a chunk)
    and the bias are additive tensors cached per shape; memory is linear in tokens.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK_OFFSETS", "mode_chunks", "local_relative_position_index", "chunk_key_mask",
    "sliding_chunk_attention", "dense_longformer2d_attention", "valid_local_pairs",
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
    ar = torch.arange(w * w)
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
    cx = torch.arange(mx).view(mx, 1, 1, 1)
    cy = torch.arange(my).view(1, my, 1, 1)
    t = torch.arange(w * w)
    off = torch.tensor([CHUNK_OFFSETS[c] for c in chunks])
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
    qx = torch.clamp(nx - torch.arange(mx) * w, max=w)                          # real query rows per chunk
    qy = torch.clamp(ny - torch.arange(my) * w, max=w)
    return int((keys * qx[:, None] * qy[None, :]).sum())


@lru_cache(maxsize=64)
def _additive_mask(nx, ny, w, chunks, device, dtype):
    valid = _chunk_key_mask(nx, ny, w, chunks, str(device))
    return torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(~valid, float("-inf"))


def _gather_neighbourhood(x: torch.Tensor, nx: int, ny: int, w: int, chunks: tuple[int, ...]) -> torch.Tensor:
    """``[B, H, nx*ny, M]`` -> ``[B, H, num_chunks, len(chunks) * w^2, M]`` (keys/values of each chunk)."""
    b, h, _, m = x.shape
    mx, my = -(-nx // w), -(-ny // w)
    x = x.view(b, h, nx, ny, m)
    # one chunk of zeros around the (bottom/right padded) map, so that every offset is a plain slice
    x = F.pad(x, (0, 0, w, w + my * w - ny, w, w + mx * w - nx))
    grid = x.view(b, h, mx + 2, w, my + 2, w, m).permute(0, 1, 2, 4, 3, 5, 6)   # [B,H,mx+2,my+2,w,w,M]
    parts = [grid[:, :, 1 + dx:1 + dx + mx, 1 + dy:1 + dy + my]
             for dx, dy in (CHUNK_OFFSETS[c] for c in chunks)]
    out = torch.stack(parts, dim=4)                                              # [B,H,mx,my,nc,w,w,M]
    return out.reshape(b, h, mx * my, len(chunks) * w * w, m)


def _chunk_queries(q: torch.Tensor, nx: int, ny: int, w: int) -> torch.Tensor:
    b, h, _, m = q.shape
    mx, my = -(-nx // w), -(-ny // w)
    q = q.view(b, h, nx, ny, m)
    if mx * w != nx or my * w != ny:
        q = F.pad(q, (0, 0, 0, my * w - ny, 0, mx * w - nx))
    q = q.view(b, h, mx, w, my, w, m).permute(0, 1, 2, 4, 3, 5, 6)
    return q.reshape(b, h, mx * my, w * w, m)


def _unchunk(x: torch.Tensor, nx: int, ny: int, w: int) -> torch.Tensor:
    b, h, _, _, m = x.shape
    mx, my = -(-nx // w), -(-ny // w)
    x = x.view(b, h, mx, my, w, w, m).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, mx * w, my * w, m)
    return x[:, :, :nx, :ny].reshape(b, h, nx * ny, m)


def sliding_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nx: int, ny: int, w: int, num_global: int,
    scale: float, rel_bias: torch.Tensor | None = None, l2g_bias: torch.Tensor | None = None,
    mode: int = 0,
) -> torch.Tensor:
    """Local-query part of ViL attention, memory linear in tokens.

    Args:
        q: ``[B, H, nx*ny, M]`` local queries (unscaled).
        k, v: ``[B, H, g + nx*ny, M]`` keys/values of all tokens (global first).
        rel_bias: ``[H, w^2, 9 w^2]`` local->local bias for the full neighbourhood (release layout), or None.
        l2g_bias: ``[H, g]`` local->global bias, or None.
        mode: release mode (0 full, -1 own chunk, 1..8 own chunk + one neighbour).
    Returns:
        ``[B, H, nx*ny, M]``.
    """
    b, h, _, m = q.shape
    g = num_global
    chunks = mode_chunks(mode)
    qc = _chunk_queries(q * scale, nx, ny, w)                                     # [B,H,nch,w2,M]
    kc = _gather_neighbourhood(k[:, :, g:], nx, ny, w, chunks)                    # [B,H,nch,K,M]
    vc = _gather_neighbourhood(v[:, :, g:], nx, ny, w, chunks)
    nch = qc.shape[2]
    attn = qc @ kc.transpose(-1, -2)                                              # [B,H,nch,w2,K]
    if rel_bias is not None:
        if mode != 0:
            w2 = w * w
            rel_bias = torch.cat([rel_bias[..., c * w2:(c + 1) * w2] for c in chunks], dim=-1)
        attn = attn + rel_bias.unsqueeze(1)
    attn = attn + _additive_mask(nx, ny, w, chunks, q.device, attn.dtype).view(nch, 1, -1)
    if g:
        ag = torch.einsum("bhnlm,bhgm->bhnlg", qc, k[:, :, :g])                   # [B,H,nch,w2,g]
        if l2g_bias is not None:
            ag = ag + l2g_bias.view(1, h, 1, 1, g)
        attn = torch.cat([ag, attn], dim=-1)
    attn = attn.softmax(dim=-1)
    if g:
        out = attn[..., g:] @ vc + torch.einsum("bhnlg,bhgm->bhnlm", attn[..., :g], v[:, :, :g])
    else:
        out = attn @ vc
    return _unchunk(out, nx, ny, w)


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
