"""Relative-position bias tables: index generation and resizing.

Used by every family with relative-position biases (ViL local and full attention, MSG-Transformer,
and any window attention). A table for a window of ``(h, w)`` query positions covering ``(h, w)`` key
positions has ``(2h-1)*(2w-1)`` rows (one per offset) and one column per head.

Resizing follows the releases: ViL's ``resize_pos_embed_2d`` is bilinear with align_corners=False and
stretches the offset grid; Swin/MSG use bicubic. Both are ``F.interpolate`` over the table viewed as an
image ``[1, H, rows, cols]``; timm's ``resize_rel_pos_bias_table`` only offers bicubic-style resampling
with its own conventions, so the exact release behaviour is kept here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relative_position_index(q_size: tuple[int, int], k_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Index ``[Nq, Nk]`` into a ``(2h-1)(2w-1)`` table for query grid ``q_size`` and key grid ``k_size``.

    Offsets are ``q_pos - k_pos``; row index ``(dy + kh - 1) * (qw + kw - 1) + (dx + kw - 1)``, the
    Swin / ViL layout (y-major). With equal grids this is Swin's ``relative_position_index``.
    """
    k_size = k_size or q_size
    qh, qw = q_size
    kh, kw = k_size
    qy, qx = torch.meshgrid(torch.arange(qh), torch.arange(qw), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    dy = qy.reshape(-1, 1) - ky.reshape(1, -1) + (kh - 1)
    dx = qx.reshape(-1, 1) - kx.reshape(1, -1) + (kw - 1)
    return dy * (qw + kw - 1) + dx


def resize_rel_pos_table_2d(
    table: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resize a ``[rows*cols, H]`` bias table to ``[new_rows*new_cols, H]`` by interpolation.

    ``mode='bilinear'`` (align_corners=False) is exactly the ViL release's ``resize_pos_embed_2d``;
    ``'bicubic'`` is Swin's. A resize to the same size returns the table unchanged.
    """
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"bias table interpolation must be 'bilinear' or 'bicubic', got {mode!r}")
    n_old, num_heads = table.shape
    if old_size is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"cannot infer a square grid for a bias table with {n_old} rows; pass old_size")
        old_size = (side, side)
    if tuple(old_size) == tuple(new_size):
        return table
    grid = table.t().reshape(1, num_heads, old_size[0], old_size[1])
    out = F.interpolate(grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid,
                        size=tuple(new_size), mode=mode, align_corners=False)
    return out.reshape(num_heads, new_size[0] * new_size[1]).t().contiguous().to(table.dtype)

