"""MSG-Transformer: window attention with one messenger (MSG) token per window.

Fang et al., "MSG-Transformer: Exchanging Local Spatial Information by Manipulating Messenger Tokens"
(CVPR 2022), https://arxiv.org/abs/2105.15168. This file follows the *released* code
(hustvl/MSG-Transformer, the 2021-12 architecture): parameter names, shapes and the computed
function are those of ``models/msg_transformer.py`` there, so released checkpoints load unchanged
(``checkpoint_filter_fn``) and float64 logits match the release to 1e-8 (tests/test_msg_transformer.py).

Architecture (released code):
  * stem: Conv 7x7 / stride 4 / pad 2 + LayerNorm (eps 1e-5 everywhere in this family);
  * per stage, the patch grid is split once into w x w windows (w = 7) grouped into R x R *shuffle
    regions*; every window carries one MSG token at index 0, layout ``[B * regions, R*R, 1 + w*w, C]``;
  * block: ``x += DropPath(WindowMSA(LN(x)))``; ``shuffle_msg(x)`` (channel groups of the R*R MSG
    tokens of a region are exchanged, paper Eq. 7); ``x += DropPath(MLP(LN(x)))``;
  * window attention bias: the Swin (2w-1)^2 relative-position table between patch tokens, plus the two
    learnable per-head constants ``rel_pos_msg[:, 0]`` (patch query -> MSG key) and ``rel_pos_msg[:, 1]``
    (MSG query -> every key, incl. itself);
  * merge between stages: one Conv 3x3 / stride 2 / pad 1 (C -> 2C) + LayerNorm, *shared* by the patch
    grid and the MSG-token grid (one MSG token per window, so the conv halves the window grid exactly);
  * head: final LayerNorm, then the MSG token of the last stage, then Linear.

Shuffle region sizes R: ``(4, 4, 2, 1)`` for classification (default); the paper's detection setting
``(4, 4, 8, 4)`` is selectable with ``shuffle_size=(4, 4, 8, 4)``.

Input sizes (not in the release, which only runs at 224). Defined here as:
  * H and W must be multiples of 32 (clear ``ValueError`` otherwise);
  * per stage the patch grid (h, w_) is zero-padded at the bottom/right to whole windows, and the window
    grid further to whole shuffle regions (the paper's detection rule: "patch tokens are padded with 0";
    padding is done once per stage, padded tokens are not masked, like Swin's non-shifted windows).
    The region size falls back to 1 in a stage whose window grid is smaller than R (as the release's
    merge layer does). The alternating top-left / bottom-right region anchors of the paper's detection
    section are **not** implemented (region anchors are always top-left);
  * the merge crops the patch grid back to (h, w_) and the MSG grid back to the real windows
    (ceil(h / w) x ceil(w_ / w)) before the shared conv, so the grids stay aligned at every stage;
  * the classifier averages the final-normed MSG tokens of the real (unpadded) last-stage windows; at
    224 with w = 7 exactly one survives and this is the release's head.
The registered ``*_384`` models keep the 224 topology with window 12 (96/48/24/12 = 8/4/2/1 windows);
``checkpoint_filter_fn`` resizes the 13x13 relative-position tables of a w = 7 checkpoint to 23x23 by
bicubic interpolation (``rel_pos_msg`` is kept as is).

Parameter counts (= release): T 25,086,116, S 55,968,514, B 84,392,770.
MACs at 224 (``models.measure.count_macs``): T 3.82 G, S 8.46 G, B 14.24 G.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .family import ReleaseLayout, register_family, register_release_layout
from .layers.checkpoint import unwrap_state_dict
from .layers.rel_pos import relative_position_index, resize_rel_pos_table_2d

__all__ = ["MSGTransformer", "checkpoint_filter_fn"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def shuffle_msg(x: torch.Tensor) -> torch.Tensor:
    """Exchange channel groups among the G = R*R MSG tokens (index 0) of each region (paper Eq. 7).

    ``x``: ``[B', G, N, C]``. New token i = concat over source tokens j of channel group i of token j.
    """
    b, g, _, c = x.shape
    if g == 1:
        return x
    msg = x[:, :, 0].reshape(b, g, g, c // g).transpose(1, 2).reshape(b, g, 1, c)
    return torch.cat((msg, x[:, :, 1:]), dim=2)


def region_partition(x: torch.Tensor, win: int, shuf: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of win*shuf) -> ``[B * regions, shuf^2, win^2, C]`` (release order)."""
    b, h, w, c = x.shape
    x = x.view(b, h // win // shuf, shuf, win, w // win // shuf, shuf, win, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, shuf * shuf, win * win, c)


def region_reverse_nchw(x: torch.Tensor, win: int, shuf: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`region_partition`, returned as ``[B, C, H, W]``."""
    c = x.shape[-1]
    x = x.reshape(-1, h // win // shuf, w // win // shuf, shuf, shuf, win, win, c)
    return x.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(-1, c, h, w)


class _StageGeometry:
    """Padding / region layout of one stage for a given patch grid (h, w)."""

    def __init__(self, h: int, w: int, win: int, shuf: int):
        self.h, self.w, self.win = h, w, win
        self.nwh, self.nww = math.ceil(h / win), math.ceil(w / win)       # real windows
        self.shuf = shuf if min(self.nwh, self.nww) >= shuf else 1
        s = self.shuf
        self.pwh, self.pww = math.ceil(self.nwh / s) * s, math.ceil(self.nww / s) * s  # padded windows
        self.ph, self.pw = self.pwh * win, self.pww * win                 # padded patch grid


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------

class MSGWindowAttention(nn.Module):
    """Window MSA over [MSG; w*w patch tokens] with relative-position bias + the two MSG constants."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 fused_attn: bool = True):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.fused_attn = fused_attn
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.rel_pos_msg = nn.Parameter(torch.zeros(num_heads, 2, 1, 1))
        self.register_buffer("relative_position_index",
                             relative_position_index((window_size, window_size)), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)
        trunc_normal_(self.rel_pos_msg, std=.02)

    def attn_bias(self) -> torch.Tensor:
        """``[heads, 1 + w*w, 1 + w*w]``: row 0 = MSG query (theta_1), column 0 = patch -> MSG (theta_2)."""
        n = self.window_size ** 2
        rpb = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        rpb = rpb.view(n, n, -1).permute(2, 0, 1)
        others2msg = self.rel_pos_msg[:, 0].expand(-1, n, -1)
        msg2all = self.rel_pos_msg[:, 1].expand(-1, -1, n + 1)
        return torch.cat((msg2all, torch.cat((others2msg, rpb), dim=-1)), dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, n, c = x.shape
        qkv = self.qkv(x).reshape(b * g, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.attn_bias().to(q.dtype).unsqueeze(0)   # 4-D mask: CPU flash kernel
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, g, n, c)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class MSGBlock(nn.Module):
    """Pre-norm window MSA -> MSG shuffle -> MLP, on ``[B * regions, R*R, 1 + w*w, C]``."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 shuffle: bool = True, fused_attn: bool = True):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = MSGWindowAttention(dim, num_heads, window_size, qkv_bias, qk_scale, attn_drop, drop,
                                       fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.shuffle = shuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.shuffle:
            x = shuffle_msg(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Conv 3x3 / s2 / p1 (C -> 2C) + LayerNorm, shared by the patch grid and the MSG-token grid."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, 2, 1)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]`` (channels-last)."""
        return self.norm(self.reduction(x).permute(0, 2, 3, 1))


class BasicLayer(nn.Module):
    """One stage: blocks, then (except the last stage) the merge into the next stage."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: Union[float, List[float]] = 0., norm_layer=nn.LayerNorm,
                 downsample: bool = False, shuffle: bool = True, fused_attn: bool = True):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.window_size = window_size
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            MSGBlock(dim, num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                     drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                     norm_layer=norm_layer, shuffle=shuffle, fused_attn=fused_attn)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class PatchEmbed(nn.Module):
    """Overlapping stem: Conv 7x7 / stride 4 / pad 2 (+ LayerNorm), output channels-last."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm_layer=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=patch_size, padding=2)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

class MSGTransformer(nn.Module):
    """MSG-Transformer (released architecture). See the module docstring for the size/padding rules."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "msg", embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, patch_norm: bool = True,
                 shuffle_size=(4, 4, 2, 1), manip_type: str = "shuf", fused_attn: bool = True):
        super().__init__()
        if manip_type not in ("shuf", "none"):
            raise ValueError(f"manip_type must be 'shuf' or 'none', got {manip_type!r}")
        if global_pool not in ("msg", ""):
            raise ValueError(f"global_pool must be 'msg' (average of the final MSG tokens) or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.window_size = window_size
        self.shuffle_size = tuple(shuffle_size)
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.drop_rate = drop_rate
        for i in range(self.num_layers):
            groups = self.shuffle_size[i] ** 2
            if int(embed_dim * 2 ** i) % groups:
                raise ValueError(f"stage {i}: {int(embed_dim * 2 ** i)} channels do not split into "
                                 f"{groups} shuffle groups (shuffle_size {self.shuffle_size[i]})")

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.msg_tokens = nn.Parameter(torch.zeros(1, self.shuffle_size[0] ** 2, 1, embed_dim))
        trunc_normal_(self.msg_tokens, std=.02)
        self.pos_drop = nn.Dropout(p=proj_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(self.num_layers):
            dim = int(embed_dim * 2 ** i)
            self.layers.append(BasicLayer(
                dim, depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale, proj_drop_rate,
                attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer,
                downsample=i < self.num_layers - 1, shuffle=manip_type == "shuf", fused_attn=fused_attn))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---- timm API --------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"msg_tokens"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table", "rel_pos_msg"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^patch_embed|^msg_tokens",
            blocks=[(r"^layers\.(\d+)", None)] if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("msg", ""):
                raise ValueError(f"global_pool must be 'msg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        if h % 32 or w % 32 or h < 32 or w < 32:
            raise ValueError(f"MSG-Transformer needs H and W to be positive multiples of 32 "
                             f"(stem stride 4 and three stride-2 merges); got {h}x{w}")

    def _stages(self, x: torch.Tensor, stop: Optional[int] = None):
        """Run the stages. Yields ``(stage index, tokens [B', G, 1+w*w, C], geometry)`` after each stage."""
        self._check_input(x)
        win = self.window_size
        t = self.pos_drop(self.patch_embed(x))                       # [B, h, w, C]
        msg = None                                                   # [B, nwh, nww, C] after a merge
        last = self.num_layers - 1 if stop is None else stop
        for i, layer in enumerate(self.layers):
            geo = _StageGeometry(t.shape[1], t.shape[2], win, self.shuffle_size[i])
            s = geo.shuf
            t = F.pad(t, (0, 0, 0, geo.pw - geo.w, 0, geo.ph - geo.h)) if (geo.ph, geo.pw) != (geo.h, geo.w) else t
            t = region_partition(t, win, s)                           # [B*nR, s*s, win*win, C]
            if msg is None:
                if s != self.shuffle_size[0]:
                    raise ValueError(f"the first stage has {geo.nwh}x{geo.nww} windows, fewer than its "
                                     f"shuffle size {self.shuffle_size[0]}; use a larger input")
                m = self.msg_tokens.expand(t.shape[0], -1, -1, -1)
            else:
                if (geo.pwh, geo.pww) != (geo.nwh, geo.nww):
                    msg = F.pad(msg, (0, 0, 0, geo.pww - geo.nww, 0, geo.pwh - geo.nwh))
                m = region_partition(msg, 1, s)                       # [B*nR, s*s, 1, C]
            z = layer(torch.cat((m.to(t.dtype), t), dim=2))
            yield i, z, geo
            if i >= last:
                return
            if layer.downsample is not None:
                msg_grid = region_reverse_nchw(z[:, :, :1], 1, s, geo.pwh, geo.pww)[:, :, :geo.nwh, :geo.nww]
                patch_grid = region_reverse_nchw(z[:, :, 1:], win, s, geo.ph, geo.pw)[:, :, :geo.h, :geo.w]
                msg = layer.downsample(msg_grid)
                t = layer.downsample(patch_grid)

    @staticmethod
    def _patch_map(z: torch.Tensor, geo: _StageGeometry) -> torch.Tensor:
        """Patch tokens of a stage's output as an NCHW map cropped to the real grid."""
        return region_reverse_nchw(z[:, :, 1:], geo.win, geo.shuf, geo.ph, geo.pw)[:, :, :geo.h, :geo.w]

    @staticmethod
    def _msg_map(z: torch.Tensor, geo: _StageGeometry) -> torch.Tensor:
        """MSG tokens of the real windows, ``[B, nwh, nww, C]``."""
        c = z.shape[-1]
        m = z[:, :, 0].reshape(-1, geo.pwh // geo.shuf, geo.pww // geo.shuf, geo.shuf, geo.shuf, c)
        m = m.permute(0, 1, 3, 2, 4, 5).reshape(-1, geo.pwh, geo.pww, c)
        return m[:, :geo.nwh, :geo.nww]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed MSG tokens of the real last-stage windows, ``[B, nwh, nww, C]`` (1x1 at 224)."""
        for i, z, geo in self._stages(x):
            pass
        return self.norm(self._msg_map(z, geo))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "msg":
            x = x.mean(dim=(1, 2)) if x.shape[1] * x.shape[2] > 1 else x[:, 0, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Patch-token maps (NCHW, cropped to the real grid) after the last block of each stage.

        MSG tokens serve only for exchanging information inside the backbone (paper §3.2, detection).
        ``norm=True`` applies the final LayerNorm to the last stage's map.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take_indices)
        stop = max_index if (stop_early or intermediates_only) else None
        intermediates = []
        z = geo = None
        for i, z, geo in self._stages(x, stop=stop):
            if i in take:
                fmap = self._patch_map(z, geo)
                if norm and i == self.num_layers - 1:
                    fmap = self.norm(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                intermediates.append(fmap if output_fmt == "NCHW" else fmap.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return self.norm(self._msg_map(z, geo)), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if max_index < self.num_layers - 1:
            self.layers[-1].downsample = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# --------------------------------------------------------------------------------------------------
# checkpoint conversion
# --------------------------------------------------------------------------------------------------



def checkpoint_filter_fn(state_dict: dict, model: MSGTransformer, interpolation: str = "bicubic") -> dict:
    """Released MSG-Transformer checkpoint -> this model's state dict.

    Accepts the wrappers ``model`` / ``module`` / ``state_dict`` / ``model_ema`` and the ``module.`` prefix;
    drops ``relative_position_index`` buffers (the model builds its own) and the unused ``avgpool``;
    resizes relative-position tables whose window differs from the model's (bicubic, as Swin's finetune;
    ``rel_pos_msg`` and ``msg_tokens`` do not depend on the window and are kept).
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.endswith("relative_position_index") or k.startswith("avgpool") or "attn_mask" in k:
            continue
        if k.endswith("relative_position_bias_table") and k in target and v.shape != target[k].shape:
            new_side = math.isqrt(target[k].shape[0])
            v = resize_rel_pos_table_2d(v, (new_side, new_side), mode=interpolation)
        out[k] = v
    return out


def release_state_dict(state_dict: dict, model: MSGTransformer, include_head: bool = True) -> dict:
    """Our MSG-Transformer weights -> the release's ``MSGTransformer.state_dict()``, the inverse of
    :func:`checkpoint_filter_fn`: the names are the release's already; each attention block's
    ``relative_position_index`` buffer (the model's own, the index the release builds) is put back after
    its parameters, where the release's ``state_dict()`` has it."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head.") and not include_head:
            continue
        out[k] = v
        if k.endswith(".attn.rel_pos_msg"):
            attn = model.get_submodule(k[:-len(".rel_pos_msg")])
            out[k[:-len("rel_pos_msg")] + "relative_position_index"] = attn.relative_position_index
    return out


register_release_layout(MSGTransformer, ReleaseLayout(
    container="model", state_dict_fn=release_state_dict,
    source="hustvl/MSG-Transformer utils.py save_checkpoint ({'model': model_without_ddp.state_dict(), ...})",
))


register_family("msg_transformer", MSGTransformer, checkpoint_filter_fn,
                interp_arg="interpolation", default_interp="bicubic")


def _create_msg_transformer(variant: str, pretrained: bool = False, **kwargs) -> MSGTransformer:
    return build_model_with_cfg(
        MSGTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs)


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "mit", "paper_ids": "arXiv:2105.15168",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "msg_transformer_tiny_224.untrained": _cfg(),
    "msg_transformer_small_224.untrained": _cfg(),
    "msg_transformer_base_224.untrained": _cfg(),
    "msg_transformer_tiny_384.untrained": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    "msg_transformer_small_384.untrained": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    "msg_transformer_base_384.untrained": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
})

_TINY = dict(embed_dim=64, depths=(2, 4, 12, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.1)
_SMALL = dict(embed_dim=96, depths=(2, 4, 12, 4), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_BASE = dict(embed_dim=96, depths=(2, 4, 28, 4), num_heads=(3, 6, 12, 24), drop_path_rate=0.5)


@register_model
def msg_transformer_tiny_224(pretrained=False, **kwargs) -> MSGTransformer:
    return _create_msg_transformer("msg_transformer_tiny_224", pretrained, **{**_TINY, **kwargs})


@register_model
def msg_transformer_small_224(pretrained=False, **kwargs) -> MSGTransformer:
    return _create_msg_transformer("msg_transformer_small_224", pretrained, **{**_SMALL, **kwargs})


@register_model
def msg_transformer_base_224(pretrained=False, **kwargs) -> MSGTransformer:
    return _create_msg_transformer("msg_transformer_base_224", pretrained, **{**_BASE, **kwargs})


@register_model
def msg_transformer_tiny_384(pretrained=False, **kwargs) -> MSGTransformer:
    return _create_msg_transformer("msg_transformer_tiny_384", pretrained,
                                   **{**_TINY, "img_size": 384, "window_size": 12, **kwargs})


@register_model
def msg_transformer_small_384(pretrained=False, **kwargs) -> MSGTransformer:
    return _create_msg_transformer("msg_transformer_small_384", pretrained,
                                   **{**_SMALL, "img_size": 384, "window_size": 12, **kwargs})


@register_model
def msg_transformer_base_384(pretrained=False, **kwargs) -> MSGTransformer:
    return _create_msg_transformer("msg_transformer_base_384", pretrained,
                                   **{**_BASE, "img_size": 384, "window_size": 12, **kwargs})
