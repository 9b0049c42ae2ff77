"""ViL: Multi-Scale Vision Longformer (Zhang et al., 2021), timm-style.

Four stacked E-ViT stages. Each stage: a p x p stride-p conv patch embedding + LayerNorm (eps 1e-6),
``g`` learned global tokens prepended (1, 1, 1, 0 by default), optional absolute position embedding
(APE), then ``depth`` pre-norm blocks ``x + DropPath(attn(LN(x)))``, ``x + DropPath(mlp(LN(x)))``.
Stages 1-2 use Vision Longformer attention (sliding ``w x w`` chunks, 3x3 chunk neighbourhood, global
tokens; :mod:`models.layers.longformer2d`), stages 3-4 full attention. Global tokens are dropped
between stages; the head mean-pools the final LayerNorm's tokens.

Semantics, parameter names (after ``checkpoint_filter_fn``) and numerics follow the release
(microsoft/vision-longformer ``msvit.py``, ``sharew=True``, ``sw_exact=0``); where that differs from the
paper, and what we chose where neither says: docs/models.md.
Medium/base are the release's "deep" variants (the paper's Table 1).

Input sizes: the local stages run at any size (chunks are zero-padded). Full-attention relative bias
tables (RPB) and APE tables are tied to the token grid of the size the model was built for
(``img_size``); other sizes need a model built for them and weights passed through
:func:`checkpoint_filter_fn`, which resizes tables as the release does (bilinear, align_corners=False).

FLOPs: :func:`models.measure.count_macs` counts local attention as *valid* query-key pairs (masked and
padded keys excluded) via ``macs_adjustment``. The paper's figures come from the release's own
``compute_macs``, which uses ``(C - Nglo)`` where the number of local queries is meant and therefore
nearly drops local attention (e.g. ViL-Small 4.86 G vs 5.19 G valid keys).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs

from .family import ReleaseLayout, register_family, register_release_layout
from .layers.checkpoint import unwrap_state_dict
from .layers.longformer2d import (
    chunk_layout, dense_longformer2d_attention, flex_longformer2d_attention, local_relative_position_index,
    sliding_chunk_attention, valid_local_pairs,
)
from .layers.rel_pos import relative_position_index, resize_rel_pos_table_2d

__all__ = ["ViL", "checkpoint_filter_fn"]

_LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------- helpers

def _grid_error(what: str, built: Tuple[int, int], got: Tuple[int, int], stage: int) -> ValueError:
    return ValueError(
        f"ViL stage {stage}: {what} was built for a {built[0]}x{built[1]} token grid but the input gives "
        f"{got[0]}x{got[1]}. Build the model for this input size (timm.create_model(name, img_size=...)) "
        f"and load the weights through models.vil.checkpoint_filter_fn(state_dict, model), which resizes "
        f"bias tables / position embeddings (as finetune does); or use a size matching the build."
    )


@lru_cache(maxsize=16)
def _full_rel_index(grid: Tuple[int, int]) -> torch.Tensor:
    """Full-attention ``[N, N]`` index (release ``Attention`` layout), cached on the CPU and shared by blocks."""
    with torch.device("cpu"):
        return relative_position_index(tuple(grid))


def resize_pos_embed_1d(pe: torch.Tensor, n_new: int) -> torch.Tensor:
    """The release's ``resize_pos_embed_1d``: ``[1, n, C']`` -> ``[1, n_new, C']``, bilinear, align_corners=False."""
    if pe.shape[1] == n_new:
        return pe
    x = pe.transpose(1, 2).unsqueeze(-1)                                         # [1, C', n, 1]
    x = F.interpolate(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x,
                      size=(n_new, 1), mode="bilinear", align_corners=False)
    return x.squeeze(-1).transpose(1, 2).to(pe.dtype)


def _attention(q, k, v, scale: float, bias: Optional[torch.Tensor] = None, drop: float = 0.) -> torch.Tensor:
    """Plain softmax attention with an additive bias (explicit matmuls: on CPU, SDPA with a float mask is slow)."""
    attn = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if drop:
        attn = F.dropout(attn, drop)
    return torch.matmul(attn, v)


# ----------------------------------------------------------------------------------------- modules

class PatchEmbed(nn.Module):
    """Conv patch embedding + LayerNorm, global tokens prepended, optional APE (x/y halves + global)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, num_global: int,
                 grid_size: Tuple[int, int], ape: bool):
        super().__init__()
        self.patch_size = patch_size
        self.num_global = num_global
        self.grid_size = tuple(grid_size)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.cls_token = nn.Parameter(torch.zeros(1, num_global, dim)) if num_global else None
        self.ape = ape
        if ape:
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, num_global, dim)) if num_global else None
            self.x_pos_embed = nn.Parameter(torch.zeros(1, grid_size[0], dim // 2))
            self.y_pos_embed = nn.Parameter(torch.zeros(1, grid_size[1], dim - dim // 2))

    def forward(self, x: torch.Tensor, stage: int = 0) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        b, _, nx, ny = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        if self.ape:
            if (nx, ny) != self.grid_size:
                raise _grid_error("the absolute position embedding (APE)", self.grid_size, (nx, ny), stage)
            pe = torch.cat([self.x_pos_embed.unsqueeze(2).expand(-1, -1, ny, -1),
                            self.y_pos_embed.unsqueeze(1).expand(-1, nx, -1, -1)], dim=-1).flatten(1, 2)
            if self.cls_pos_embed is not None:
                pe = torch.cat([self.cls_pos_embed, pe], dim=1)
            x = x + pe
        return x, nx, ny


class LongformerAttention(nn.Module):
    """ViL local attention (release ``Long2DSCSelfAttention``, ``sharew=True``, ``exact=0``).

    ``impl='chunk'`` (default) is the sliding-chunk implementation with memory linear in tokens;
    ``impl='dense'`` the masked dense reference; ``impl='flex'`` FlexAttention (fused on CUDA, CPU
    inference only: see :mod:`models.layers.longformer2d`). ``mode`` 0 = full neighbourhood; 1..8 =
    random shift in training (own chunk + one random neighbour per forward, full neighbourhood in eval);
    -1 = own chunk.
    """

    count_release_global_kv = True   # MAC convention of our reported figures (see macs_adjustment)
    IMPLS = ("chunk", "dense", "flex")
    LAYOUT_BUFFERS = ("chunk_q_idx", "chunk_k_idx", "chunk_inv_idx", "chunk_mask")

    def __init__(self, dim: int, num_heads: int, window: int, num_global: int = 1, rpb: bool = True,
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0., mode: int = 0,
                 impl: str = "chunk", grid_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window = window
        self.num_global = num_global
        self.mode = mode
        self.impl = impl
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpb = rpb
        if rpb:
            self.local_relative_position_bias_table = nn.Parameter(torch.zeros((4 * window - 1) ** 2, num_heads))
            if num_global:
                self.g2l_relative_position_bias = nn.Parameter(torch.zeros(2, num_heads, num_global))
                self.g2g_relative_position_bias = nn.Parameter(torch.zeros(num_heads, num_global, num_global))
            self.register_buffer("relative_position_index",
                                 local_relative_position_index(window).to(torch.empty(0).device, copy=True),
                                 persistent=False)
        self.grid_size = tuple(grid_size) if grid_size else None
        if self.grid_size:
            # the sliding-chunk layout of the built grid in the full-neighbourhood mode (evaluation, and
            # training unless random shift is on), held as buffers so that torch.compile takes them as graph
            # inputs instead of tracing the index builders (other grids and modes build them per call)
            layout = chunk_layout(*self.grid_size, window, num_global, 0, "cpu")
            for name, t in zip(self.LAYOUT_BUFFERS, layout):
                self.register_buffer(name, t.to(torch.empty(0).device), persistent=False)
        self._last_grid = None

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        if impl not in self.IMPLS:
            raise ValueError(f"unknown ViL attn_impl {impl!r}: choose 'chunk' (default, sliding chunks), "
                             f"'dense' (masked reference, quadratic memory) or 'flex' (FlexAttention)")
        self._impl = impl

    def _mode(self) -> int:
        if self.mode > 0:
            return int(torch.randint(1, 9, ()).item()) if self.training else 0
        return self.mode

    def forward(self, x: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
        b, n, c = x.shape
        g, h, m = self.num_global, self.num_heads, self.head_dim
        self._last_grid = (nx, ny)
        mode = self._mode()
        q = self.query(x).view(b, n, h, m).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, h, m).permute(2, 0, 3, 1, 4).unbind(0)
        table = self.local_relative_position_bias_table if self.rpb else None
        g2l = self.g2l_relative_position_bias if (self.rpb and g) else None
        g2g = self.g2g_relative_position_bias if (self.rpb and g) else None
        if self.impl == "dense":
            out = dense_longformer2d_attention(q, k, v, nx, ny, self.window, g, self.scale,
                                               table, g2l, g2g, mode=mode)
            if self.training and self.attn_drop:
                raise NotImplementedError("attention dropout is not implemented in the dense reference")
        elif self.impl == "flex":
            if self.training and self.attn_drop:
                raise NotImplementedError("attention dropout is not implemented with attn_impl='flex'")
            out = flex_longformer2d_attention(q, k, v, nx, ny, self.window, g, self.scale,
                                              table, g2l, g2g, mode=mode)
        else:
            rel = None
            if table is not None:
                w2 = self.window ** 2
                rel = table[self.relative_position_index.view(-1)].view(w2, 9 * w2, h).permute(2, 0, 1)
            layout = None
            if mode == 0 and (nx, ny) == self.grid_size:
                layout = tuple(getattr(self, name) for name in self.LAYOUT_BUFFERS)
            out_l = sliding_chunk_attention(q[:, :, g:], k, v, nx, ny, self.window, g, self.scale,
                                            rel, None if g2l is None else g2l[1], mode=mode, layout=layout)
            if g:
                bias = None
                if g2g is not None:
                    bias = torch.cat([g2g, g2l[0].unsqueeze(-1).expand(-1, -1, n - g)], dim=-1).to(q.dtype)
                out_g = _attention(q[:, :, :g], k, v, self.scale, bias, self.attn_drop if self.training else 0.)
                out = torch.cat([out_g, out_l], dim=2)
            else:
                out = out_l
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return self.proj_drop(out)

    def macs_adjustment(self, input_shape: Sequence[int]) -> int:
        """Correct the counted local-attention MACs (all ``9 w^2`` chunk keys, padded queries) to valid pairs."""
        if self.impl != "chunk" or self._last_grid is None:
            return 0
        b = input_shape[0]
        nx, ny = self._last_grid
        w, g, hm = self.window, self.num_global, self.num_heads * self.head_dim
        nch = (-(-nx // w)) * (-(-ny // w))
        counted = 2 * b * hm * nch * w * w * (9 * w * w + g)           # q.k and attn.v, chunk layout
        valid = 2 * b * hm * (valid_local_pairs(nx, ny, w) + nx * ny * g)
        adj = valid - counted
        if self.count_release_global_kv and g:
            # the release projects k/v of all tokens a second time for its global queries (kv_global, tied to
            # kv); our reported MACs (ViL-Small 5.191 G at 224) include it, this implementation computes it once.
            adj += b * (g + nx * ny) * 2 * hm * hm
        return adj


class FullAttention(nn.Module):
    """Full MSA of stages 3-4 (release ``Attention``), RPB table ``[(2nx-1)(2ny-1), H]`` + g2l/g2g biases."""

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], num_global: int = 1,
                 rpb: bool = True, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_global = num_global
        self.grid_size = tuple(grid_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpb = rpb
        if rpb:
            gx, gy = self.grid_size
            self.local_relative_position_bias_table = nn.Parameter(torch.zeros((2 * gx - 1) * (2 * gy - 1), num_heads))
            if num_global:
                self.g2l_relative_position_bias = nn.Parameter(torch.zeros(2, num_heads, num_global))
                self.g2g_relative_position_bias = nn.Parameter(torch.zeros(num_heads, num_global, num_global))
            self.register_buffer("relative_position_index", _full_rel_index(self.grid_size).to(torch.empty(0).device),
                                 persistent=False)
        self.stage = 0

    def _bias(self) -> torch.Tensor:
        nl = self.grid_size[0] * self.grid_size[1]
        bias = self.local_relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(nl, nl, -1).permute(2, 0, 1)
        if self.num_global:
            g2l, g2g = self.g2l_relative_position_bias, self.g2g_relative_position_bias
            top = torch.cat([g2g, g2l[0].unsqueeze(-1).expand(-1, -1, nl)], dim=-1)
            bottom = torch.cat([g2l[1].unsqueeze(1).expand(-1, nl, -1), bias], dim=-1)
            bias = torch.cat([top, bottom], dim=1)
        return bias

    def forward(self, x: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.rpb:
            if (nx, ny) != self.grid_size:
                raise _grid_error("the full-attention relative position bias table", self.grid_size, (nx, ny),
                                  self.stage)
            bias = self._bias().to(q.dtype)
        out = _attention(q, k, v, self.scale, bias, self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm attention block and MLP block (the release's ``AttnBlock`` + ``MlpBlock``, same drop-path)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4., drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), nx, ny))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViLStage(nn.Module):
    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, patch_size: int, num_global: int,
                 window: Optional[int], grid_size: Tuple[int, int], ape: bool, stage: int,
                 drop_path: Sequence[float], drop_rate: float = 0., attn_drop_rate: float = 0.,
                 mode: int = 0, attn_impl: str = "chunk"):
        super().__init__()
        self.stage = stage
        self.num_global = num_global
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, num_global, grid_size, ape)
        blocks = []
        for i in range(depth):
            if window:
                attn = LongformerAttention(dim, num_heads, window, num_global, rpb=not ape,
                                           attn_drop=attn_drop_rate, proj_drop=drop_rate, mode=mode, impl=attn_impl,
                                           grid_size=grid_size)
            else:
                attn = FullAttention(dim, num_heads, grid_size, num_global, rpb=not ape,
                                     attn_drop=attn_drop_rate, proj_drop=drop_rate)
                attn.stage = stage
            blocks.append(Block(dim, attn, drop=drop_rate, drop_path=drop_path[i]))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Image/map ``[B, C, H, W]`` -> tokens ``[B, g + nx*ny, C]`` (global first) and the grid."""
        x, nx, ny = self.patch_embed(x, self.stage)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, nx, ny, use_reentrant=False)
            else:
                x = blk(x, nx, ny)
        return x, nx, ny

    def to_map(self, x: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
        """Drop the global tokens, ``[B, g + nx*ny, C]`` -> ``[B, C, nx, ny]``."""
        return x[:, self.num_global:].transpose(1, 2).reshape(x.shape[0], -1, nx, ny)


# ----------------------------------------------------------------------------------------- model

class ViL(nn.Module):
    """Multi-Scale Vision Longformer.

    Args:
        img_size: input size the token-grid-tied tables (APE, full-attention RPB) are built for.
        embed_dims, depths, num_heads, patch_sizes, num_global: per stage.
        windows: chunk size ``w`` per stage, ``None`` (or 0) for full attention.
        ape: absolute position embedding instead of relative position bias.
        vil_mode: release attention mode (0 full; 1..8 random-shift training; -1 own chunk only).
        attn_impl: ``'chunk'`` (efficient, default), ``'dense'`` (masked reference) or ``'flex'``
            (FlexAttention; trains on CUDA only); anything else is refused.
        global_pool: ``'avg'`` (mean over all final tokens, the release with g=0 in stage 4) or ``'token'``.
    """

    def __init__(
        self, img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3, num_classes: int = 1000,
        embed_dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (1, 2, 8, 1),
        num_heads: Sequence[int] = (3, 3, 6, 12), patch_sizes: Sequence[int] = (4, 2, 2, 2),
        num_global: Sequence[int] = (1, 1, 1, 0), windows: Sequence[Optional[int]] = (7, 7, None, None),
        ape: bool = False, mlp_ratio: float = 4., drop_rate: float = 0., proj_drop_rate: float = 0.,
        attn_drop_rate: float = 0., drop_path_rate: float = 0.1, vil_mode: int = 0, attn_impl: str = "chunk",
        global_pool: str = "avg",
    ):
        super().__init__()
        assert global_pool in ("avg", "token", "")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_global = tuple(num_global)
        self.img_size = img_size
        self.grad_checkpointing = False
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        grid = img_size
        stages, self.feature_info = [], []
        prev, reduction, cur = in_chans, 1, 0
        for i in range(len(depths)):
            grid = (grid[0] // patch_sizes[i], grid[1] // patch_sizes[i])
            reduction *= patch_sizes[i]
            stages.append(ViLStage(
                prev, embed_dims[i], depths[i], num_heads[i], patch_sizes[i], num_global[i], windows[i] or None,
                grid, ape, i + 1, dpr[cur:cur + depths[i]], proj_drop_rate, attn_drop_rate, vil_mode, attn_impl))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            prev, cur = embed_dims[i], cur + depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features, eps=_LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for n, p in self.named_parameters():
            if any(s in n for s in ("cls_token", "pos_embed", "relative_position")):
                trunc_normal_(p, std=.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm API -----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters()
                if any(s in n for s in ("cls_token", "pos_embed", "relative_position"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.patch_embed", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ("avg", "token", "")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_vil_mode(self, mode: int) -> None:
        """The release's ``reset_vil_mode``: e.g. switch random-shift training (1..8) back to full (0)."""
        for m in self.modules():
            if isinstance(m, LongformerAttention):
                m.mode = mode

    def set_attn_impl(self, impl: str) -> None:
        for m in self.modules():
            if isinstance(m, LongformerAttention):
                m.impl = impl

    # --- forward ------------------------------------------------------------------------------
    def forward_intermediates(
        self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
        stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ):
        """Stage maps ``[B, C, H, W]`` (global tokens dropped, before the final norm) and final tokens."""
        assert output_fmt in ("NCHW", "NHWC")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        nx = ny = None
        for i, stage in enumerate(stages):
            if i:
                x = self.stages[i - 1].to_map(x, nx, ny)
            x, nx, ny = stage(x)
            if i in take_indices:
                fm = stage.to_map(x, nx, ny)
                if norm and i == len(self.stages) - 1:
                    fm = self.norm(fm.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                intermediates.append(fm.permute(0, 2, 3, 1).contiguous() if output_fmt == "NHWC" else fm)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm'ed tokens ``[B, g4 + nx*ny, C]``."""
        nx = ny = None
        for i, stage in enumerate(self.stages):
            if i:
                x = self.stages[i - 1].to_map(x, nx, ny)
            x, nx, ny = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------- checkpoints



def _official_to_ours(key: str) -> Optional[str]:
    """Release key (``layerS.I.…``) -> our key; None for keys we drop. Our keys pass unchanged."""
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", key)
    if not m:
        return key
    s, i, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    if i == 0:
        rest = re.sub(r"^norm_embed\.", "norm.", rest)
        return f"stages.{s}.patch_embed.{rest}"
    blk, is_mlp = (i - 1) // 2, (i - 1) % 2 == 1
    if is_mlp:
        rest = re.sub(r"^norm\.", "norm2.", rest)
    else:
        rest = re.sub(r"^norm\.", "norm1.", rest)
    return f"stages.{s}.blocks.{blk}.{rest}"


def checkpoint_filter_fn(state_dict: dict, model: ViL, interpolation: str = "bilinear") -> dict:
    """Convert a released (or our own) ViL state dict for ``model``; the timm pretrained filter.

    * unwraps ``state_dict`` / ``model`` / ``module`` / ``model_ema`` wrappers and the ``module.`` prefix;
    * maps the release's ``layerS.I.*`` keys to ours, drops the tied ``*_global`` duplicates (checked equal),
      ``relative_position_index`` buffers (regenerated by the model) and zero-sized tensors (APE
      ``cls_pos_embed`` of a stage without global tokens);
    * resizes, when the model's shape differs, every relative-position bias table (local ``(4w-1)^2`` and
      full-attention ``(2n-1)^2``) by ``interpolation`` (``'bilinear'``, align_corners=False, exactly the
      release; ``'bicubic'`` selectable) and the APE ``x/y_pos_embed`` as the release's
      ``resize_pos_embed_1d``; g2l/g2g biases and global tokens are kept;
    * **head**: if ``head.weight``/``head.bias`` do not match the model's head (other ``num_classes``), they
      are dropped so that the caller decides (finetune's ``head=keep|reinit|map21k``; timm's
      ``pretrained=True`` with another ``num_classes`` drops the head itself).
    """
    sd = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k:
            continue
        gm = re.match(r"^(.*)\.(query|kv|proj)_global\.(weight|bias)$", k)
        if gm:
            tied = f"{gm.group(1)}.{gm.group(2)}.{gm.group(3)}"
            if tied in sd and not torch.equal(sd[tied], v):
                raise ValueError(f"{k} differs from {tied}: this ViL checkpoint was trained with sharew=False, "
                                 f"which this implementation does not support")
            continue
        nk = _official_to_ours(k)
        if v.numel() == 0 and nk not in target:
            continue
        if nk not in target:
            out[nk] = v                                      # unknown key: let strict loading report it
            continue
        t = target[nk]
        if v.shape != t.shape:
            if nk.endswith("local_relative_position_bias_table"):
                module = model.get_submodule(nk.rsplit(".", 1)[0])
                if isinstance(module, FullAttention):
                    gx, gy = module.grid_size
                    new = (2 * gx - 1, 2 * gy - 1)
                else:
                    new = (4 * module.window - 1,) * 2
                v = resize_rel_pos_table_2d(v, new, mode=interpolation)
            elif nk.endswith("x_pos_embed") or nk.endswith("y_pos_embed"):
                v = resize_pos_embed_1d(v, t.shape[1])
            elif nk.startswith("head."):
                continue
            else:
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, the model expects "
                                 f"{tuple(t.shape)} for {nk}, and no resize rule applies")
        out[nk] = v
    return out


def _ours_to_official(key: str) -> str:
    """Inverse of :func:`_official_to_ours`: our key -> the release's ``layerS.I.…`` key."""
    m = re.match(r"^stages\.(\d+)\.patch_embed\.(.*)$", key)
    if m:
        rest = re.sub(r"^norm\.", "norm_embed.", m.group(2))
        return f"layer{int(m.group(1)) + 1}.0.{rest}"
    m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
    if not m:
        return key
    s, b, rest = int(m.group(1)) + 1, int(m.group(2)), m.group(3)
    if rest.startswith(("norm2.", "mlp.")):
        return f"layer{s}.{2 * b + 2}." + re.sub(r"^norm2\.", "norm.", rest)
    return f"layer{s}.{2 * b + 1}." + re.sub(r"^norm1\.", "norm.", rest)


def release_state_dict(state_dict: dict, model: ViL, include_head: bool = True) -> dict:
    """Our ViL weights -> the release's ``MsViT.state_dict()``: the inverse of :func:`checkpoint_filter_fn`.

    ``state_dict`` is ``model.state_dict()`` (any size/windows, e.g. a model finetuned at 384 with its
    resized tables). Keys come in the release's order (a module's parameters, then its buffers, then its
    children), with what the release saves beyond our weights: each RPB block's
    ``relative_position_index`` (the model's own buffer, the index the release builds), the local stages'
    tied ``{query,kv,proj}_global.*`` copies (``sharew=True``: the same tensors) and, in APE stages without
    global tokens, the release's empty ``cls_pos_embed`` ``[1, 0, C]``.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head.") and not include_head:
            continue
        ok = _ours_to_official(k)
        if k.endswith(".patch_embed.x_pos_embed"):
            embed = model.get_submodule(k.rsplit(".", 1)[0])
            if not embed.num_global:
                out[ok.replace(".x_pos_embed", ".cls_pos_embed")] = v.new_zeros(1, 0, embed.proj.out_channels)
        out[ok] = v
        m = re.match(r"^(stages\.\d+\.blocks\.\d+\.attn)\.(.+)$", k)
        if not m:
            continue
        attn, name = model.get_submodule(m.group(1)), m.group(2)
        last_own = "g2g_relative_position_bias" if attn.num_global else "local_relative_position_bias_table"
        if attn.rpb and name == last_own:
            out[ok.rsplit(".", 1)[0] + ".relative_position_index"] = attn.relative_position_index
        if isinstance(attn, LongformerAttention) and name == "proj.bias":
            base = ok[:-len("proj.bias")]
            for layer in ("query", "kv", "proj"):
                for p in ("weight", "bias"):
                    out[f"{base}{layer}_global.{p}"] = out[f"{base}{layer}.{p}"]
    return out


D2_PREFIX = "backbone.bottom_up."


def _parse_release_arch(arch: str) -> List[dict]:
    """The release's ``MODEL...MSVIT.ARCH`` string (``l1,h3,d96,n1,s1,g1,p4,f7,a0_l2,...``) with its defaults."""
    stages = []
    for stage in arch.split("_"):
        cfg = dict(l=1, h=3, d=192, n=1, s=1, g=1, p=2, f=7, a=1)
        cfg.update((a[0], int(a[1:])) for a in stage.split(","))
        stages.append(cfg)
    return stages


def detection_arch(model: ViL, window: int = 7) -> str:
    """The detection ARCH of the release's ``*_sparse`` detectron2 configs for ``model``: Vision Longformer
    attention (``s1``) with window ``f7`` in every stage, the model's widths, depths, heads and global tokens."""
    parts = []
    for i, st in enumerate(model.stages):
        e = st.patch_embed
        parts.append(f"l{i + 1},h{st.blocks[0].attn.num_heads},d{e.proj.out_channels},n{len(st.blocks)},s1,"
                     f"g{st.num_global},p{e.patch_size},f{window},a{int(e.ape)}")
    return "_".join(parts)


def detection_backbone(model: ViL, arch: Optional[str] = None, img_size: int = 1333) -> ViL:
    """The detection repo's ``MsViT`` backbone for ``arch`` (default :func:`detection_arch`) at
    ``INPUT.MAX_SIZE_TRAIN = img_size``, as our ViL on the meta device: the same parameter layout, and
    the default 1000-class head the detection backbone keeps."""
    arch = arch or detection_arch(model)
    stages = _parse_release_arch(arch)
    if len({s["a"] for s in stages}) != 1:
        raise ValueError(f"detection arch {arch!r} mixes APE and RPB stages, which ViL here does not build")
    stride = 1
    for s in stages:
        stride *= s["p"]
    size = (img_size + stride - 1) // stride * stride
    with torch.device("meta"):
        return ViL(img_size=size, num_classes=1000, embed_dims=[s["d"] for s in stages],
                   depths=[s["n"] for s in stages], num_heads=[s["h"] for s in stages],
                   patch_sizes=[s["p"] for s in stages], num_global=[s["g"] for s in stages],
                   windows=[s["f"] if s["s"] else None for s in stages], ape=bool(stages[0]["a"]))


def release_d2_checkpoint(release_sd: dict, model: ViL, arch: Optional[str] = None, img_size: int = 1333) -> dict:
    """What the release's detectron2 converter writes for the classification weights ``release_sd``.

    The converter (microsoft/VisionLongformerForObjectDetection ``converter.py``) reads ``checkpoint["net"]``
    and keeps, for the detection backbone it builds from the config (``MODEL.TRANSFORMER.MSVIT.ARCH`` =
    ``arch``, default :func:`detection_arch`; ``INPUT.MAX_SIZE_TRAIN`` = ``img_size``), every key that
    backbone has under ``backbone.bottom_up.``: global tokens expanded to its count, ``attn.proj`` also
    written as ``attn.proj_global``, APE tables and local bias tables resized bilinearly to its shapes,
    full-attention ``attn.qkv`` split into ``query``/``query_global`` (first third) and ``kv``/``kv_global``,
    ``relative_position_index`` skipped. The result is ``{"model": {...}}`` (what it ``torch.save``s).
    """
    det = detection_backbone(model, arch, img_size)
    target = release_state_dict(det.state_dict(), det)
    out = {}
    for k, v in release_sd.items():
        if k in target:
            t = target[k]
            if "relative_position_index" in k:
                continue
            if "cls_token" in k:
                v = v.expand(-1, t.shape[1], -1)
            elif "attn.proj" in k:
                out[k] = v
                tied = k.replace("attn.proj", "attn.proj_global")
                if tied in target:
                    out[tied] = v
                continue
            elif ("x_pos_embed" in k or "y_pos_embed" in k) and v.shape != t.shape:
                v = resize_pos_embed_1d(v, t.shape[1])
            elif "local_relative_position_bias_table" in k and v.shape != t.shape:
                side = int(t.shape[0] ** 0.5 + 0.5)
                v = resize_rel_pos_table_2d(v, (side, side), mode="bilinear")
            out[k] = v
        elif "attn.qkv" in k:
            dim = v.shape[0] // 3
            for layer, part in (("query", v[:dim]), ("query_global", v[:dim]), ("kv", v[dim:]), ("kv_global", v[dim:])):
                nk = k.replace("attn.qkv", f"attn.{layer}")
                if nk in target:
                    out[nk] = part
    return {"model": {D2_PREFIX + k: v for k, v in out.items()}}


register_release_layout(ViL, ReleaseLayout(
    container="net", container_extra=(("arch", "msvit"),), state_dict_fn=release_state_dict,
    source="microsoft/vision-longformer src/utils/checkpoint.py Checkpointer.save ({'net': state_dict, "
           "'arch': cfg.MODEL.ARCH}; Checkpointer._load_model requires arch == 'msvit')",
    d2_fn=release_d2_checkpoint, d2_target_fn=detection_backbone,
    d2_source="microsoft/VisionLongformerForObjectDetection converter.py main() ({'model': {'backbone.bottom_up.' + k}})",
))


register_family("vil", ViL, checkpoint_filter_fn, interp_arg="interpolation", default_interp="bilinear")


def _create_vil(variant: str, pretrained: bool = False, **kwargs) -> ViL:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        ViL, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=False, out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# ----------------------------------------------------------------------------------------- cfgs

def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2103.15358", **kwargs,
    }


_CFG_384 = dict(input_size=(3, 384, 384), crop_pct=0.922)
default_cfgs = generate_default_cfgs({
    f"vil_{size}_{pos}_{res}.untrained": _cfg(**(_CFG_384 if res == 384 else {}))
    for size in ("tiny", "small", "medium", "base") for pos in ("rpb", "ape") for res in (224, 384)
})

# The paper's Table 1 (medium/base are the release's "deep" variants).
_ARCHS = {
    "tiny": dict(embed_dims=(48, 96, 192, 384), depths=(1, 1, 9, 1), num_heads=(1, 3, 3, 6)),
    "small": dict(embed_dims=(96, 192, 384, 768), depths=(1, 2, 8, 1), num_heads=(3, 3, 6, 12)),
    "medium": dict(embed_dims=(96, 192, 384, 768), depths=(1, 4, 16, 1), num_heads=(3, 3, 6, 12)),
    "base": dict(embed_dims=(96, 192, 384, 768), depths=(1, 8, 24, 1), num_heads=(3, 3, 6, 12)),
}
_WINDOWS = {224: (7, 7, None, None), 384: (6, 8, None, None)}


def _vil(size: str, pos: str, res: int, pretrained: bool, **kwargs) -> ViL:
    args = dict(_ARCHS[size], windows=_WINDOWS[res], ape=(pos == "ape"), img_size=res)
    args.update(kwargs)
    return _create_vil(f"vil_{size}_{pos}_{res}", pretrained=pretrained, **args)


@register_model
def vil_tiny_rpb_224(pretrained=False, **kwargs) -> ViL:
    return _vil("tiny", "rpb", 224, pretrained, **kwargs)


@register_model
def vil_tiny_ape_224(pretrained=False, **kwargs) -> ViL:
    return _vil("tiny", "ape", 224, pretrained, **kwargs)


@register_model
def vil_small_rpb_224(pretrained=False, **kwargs) -> ViL:
    return _vil("small", "rpb", 224, pretrained, **kwargs)


@register_model
def vil_small_ape_224(pretrained=False, **kwargs) -> ViL:
    return _vil("small", "ape", 224, pretrained, **kwargs)


@register_model
def vil_medium_rpb_224(pretrained=False, **kwargs) -> ViL:
    return _vil("medium", "rpb", 224, pretrained, **kwargs)


@register_model
def vil_medium_ape_224(pretrained=False, **kwargs) -> ViL:
    return _vil("medium", "ape", 224, pretrained, **kwargs)


@register_model
def vil_base_rpb_224(pretrained=False, **kwargs) -> ViL:
    return _vil("base", "rpb", 224, pretrained, **kwargs)


@register_model
def vil_base_ape_224(pretrained=False, **kwargs) -> ViL:
    return _vil("base", "ape", 224, pretrained, **kwargs)


@register_model
def vil_tiny_rpb_384(pretrained=False, **kwargs) -> ViL:
    return _vil("tiny", "rpb", 384, pretrained, **kwargs)


@register_model
def vil_tiny_ape_384(pretrained=False, **kwargs) -> ViL:
    return _vil("tiny", "ape", 384, pretrained, **kwargs)


@register_model
def vil_small_rpb_384(pretrained=False, **kwargs) -> ViL:
    return _vil("small", "rpb", 384, pretrained, **kwargs)


@register_model
def vil_small_ape_384(pretrained=False, **kwargs) -> ViL:
    return _vil("small", "ape", 384, pretrained, **kwargs)


@register_model
def vil_medium_rpb_384(pretrained=False, **kwargs) -> ViL:
    return _vil("medium", "rpb", 384, pretrained, **kwargs)


@register_model
def vil_medium_ape_384(pretrained=False, **kwargs) -> ViL:
    return _vil("medium", "ape", 384, pretrained, **kwargs)


@register_model
def vil_base_rpb_384(pretrained=False, **kwargs) -> ViL:
    return _vil("base", "rpb", 384, pretrained, **kwargs)


@register_model
def vil_base_ape_384(pretrained=False, **kwargs) -> ViL:
    return _vil("base", "ape", 384, pretrained, **kwargs)
