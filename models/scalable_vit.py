"""ScalableViT: alternating interactive window attention (IWSA) and scalable self-attention (SSA).

Yang et al., "ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer"
(ECCV 2022), https://arxiv.org/abs/2203.10790. This file follows the *released* code
(Yangr116/ScalableViT, ``image_classification/models/scalablevit.py``): parameter names, shapes and the
computed function are the release's, so released checkpoints load unchanged (``checkpoint_filter_fn``)
and float64 logits match the release to 1e-8 (tests/test_scalable_vit.py).

Architecture (released code):
  * per stage a conv patch embedding + LayerNorm(eps 1e-6): 7x7/s4/p3 for stage 1, 3x3/s2/p1 after;
  * blocks alternate: even index = IWSA (window 7 attention, no bias table, plus the LIM, a depthwise
    3x3 conv on V in image layout added to the attention output before ``proj``); odd index = SSA
    (spatial reduction r_n: depthwise conv k = s = sr in {8, 4, 2}, then 1x1 conv C -> C' = int(C * r_c),
    LayerNorm(C', eps 1e-5) + GELU; q: C -> C', k: C' -> C', v: C' -> C; scale (head_dim * r_c)^-0.5;
    stage 4 (sr = 1) is plain MHSA with a ``kv`` projection);
  * PEG (depthwise 3x3 + residual) after block 0 of every stage;
  * head: final LayerNorm(eps 1e-6), global average pool, then the release's two-layer head
    Linear(C, 4096) -> LayerNorm(4096, eps 1e-6) -> GELU -> Linear(4096, classes);
    ``plain_head=True`` gives a single Linear (the release's ``scalable_vit_small_0`` option).

Variants (Table 1 / released factories): S dims 64.. depths (2,2,20,2) r_c (1.25,1.25,1.25,1);
B dims 96.. depths (2,2,14,6) r_c (2,1.25,1.25,1); L dims 128.. depths (2,6,12,4) r_c (0.25,0.5,1,1).
Parameter counts (= release): S 32,000,472, B 81,881,624, L 109,288,840. **The paper (Table 2) says
104M and the release's README 104.9M for L; the released code's L has 109.29M (4.4M more) and we follow the
code.** MACs at 224 (``models.measure.count_macs``, attention matmuls included): S 4.27 G, B 8.80 G,
L 14.99 G (the paper's 4.2 / 8.6 / 14.7 G exclude the attention matmuls).

Input sizes (the release requires every stage map to be divisible by 7, i.e. only 224):
  * H and W must be multiples of 32 (clear ``ValueError`` otherwise);
  * IWSA zero-pads its (normed) input at the bottom/right to the window grid and crops the output back
    (Swin's rule for non-shifted windows: padded tokens are not masked); the LIM sees the unpadded V map
    with its own zero padding; SSA needs no padding (its strided reduction floors, as released);
  * the registered ``*_384`` models use window 12 (96/48/24/12 = 8/4/2/1 windows, the 224 topology);
    the SSA reductions are unchanged, and no tensor depends on the input size, so a 224 checkpoint
    loads as is.
"""
from __future__ import annotations

from functools import partial
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
from .layers.peg import PosConv

__all__ = ["ScalableViT", "checkpoint_filter_fn"]


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------


def _attend(q, k, v, scale: float, attn_drop: nn.Dropout, fused: bool, training: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v for IWSA and SSA: PyTorch's fused kernel, or the release's explicit form."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=attn_drop.p if training else 0.)
    return attn_drop(((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)) @ v


class IWSA(nn.Module):
    """Interactive window self-attention: window MSA + local interactive module (DWConv3x3 on V)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0., proj_drop: float = 0., ws: int = 7, fused_attn: bool = True):
        super().__init__()
        if ws <= 1:
            raise ValueError("IWSA needs a window larger than 1")
        if dim % num_heads:
            raise ValueError(f"dim {dim} should be divided by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ws = ws
        self.fused_attn = fused_attn
        self.lim_func = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        ws, nh = self.ws, self.num_heads
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        qkv = self.qkv(x)                                                    # [B, Hp, Wp, 3C]
        v_map = qkv[:, :h, :w, 2 * c:].permute(0, 3, 1, 2)                   # LIM on the unpadded V map
        lim = self.lim_func(v_map).permute(0, 2, 3, 1)
        gh, gw = hp // ws, wp // ws
        qkv = qkv.view(b, gh, ws, gw, ws, 3, nh, c // nh).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, b * gh * gw, nh, ws * ws, c // nh).unbind(0)
        o = _attend(q, k, v, self.scale, self.attn_drop, self.fused_attn, self.training)
        o = o.view(b, gh, gw, nh, ws, ws, c // nh).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
        if pad_h or pad_w:
            o = o[:, :h, :w]
        return self.proj_drop(self.proj(o + lim))


class SSA(nn.Module):
    """Scalable self-attention: spatial (sr) and channel (c_ratio) scaling of keys/values."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0., proj_drop: float = 0., sr_ratio: int = 1, c_ratio: float = 1.25,
                 fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} should be divided by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.c_new = int(dim * c_ratio)
        self.scale = qk_scale or (dim // num_heads * c_ratio) ** -0.5        # released scale
        self.fused_attn = fused_attn
        if sr_ratio > 1:
            self.q = nn.Linear(dim, self.c_new, bias=qkv_bias)
            self.reduction = nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim),
                nn.Conv2d(dim, self.c_new, kernel_size=1, stride=1))
            self.norm_act = nn.Sequential(nn.LayerNorm(self.c_new), nn.GELU())   # eps 1e-5 as released
            self.k = nn.Linear(self.c_new, self.c_new, bias=qkv_bias)
            self.v = nn.Linear(self.c_new, dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        nh = self.num_heads
        if self.sr_ratio > 1:
            r = self.reduction(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)   # [B, N', C']
            r = self.norm_act(r)
            q = self.q(x).reshape(b, h * w, nh, self.c_new // nh).transpose(1, 2)
            k = self.k(r).reshape(b, -1, nh, self.c_new // nh).transpose(1, 2)
            v = self.v(r).reshape(b, -1, nh, c // nh).transpose(1, 2)
        else:
            q = self.q(x).reshape(b, h * w, nh, c // nh).transpose(1, 2)
            k, v = self.kv(x).reshape(b, h * w, 2, nh, c // nh).permute(2, 0, 3, 1, 4).unbind(0)
        o = _attend(q, k, v, self.scale, self.attn_drop, self.fused_attn, self.training)
        o = o.transpose(1, 2).reshape(b, h, w, c)
        return self.proj_drop(self.proj(o))


class ScalableViTBlock(nn.Module):
    """Pre-norm block; ``ws == 1`` selects SSA, otherwise IWSA with window ``ws``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0., act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, c_ratio: float = 1.25, sr_ratio: int = 1, ws: int = 1,
                 fused_attn: bool = True):
        super().__init__()
        self.norm1 = norm_layer(dim)
        if ws == 1:
            self.attn = SSA(dim, num_heads, qkv_bias, None, attn_drop, drop, sr_ratio, c_ratio,
                            fused_attn=fused_attn)
        else:
            self.attn = IWSA(dim, num_heads, qkv_bias, None, attn_drop, drop, ws, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvPatchEmbed(nn.Module):
    """Conv (kernel patch + overlapping, stride patch, padding overlapping) + norm; NCHW in, NHWC out."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 64, overlapping: int = 3,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size + overlapping, patch_size, overlapping)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

class ScalableViT(nn.Module):
    """ScalableViT (released architecture). See the module docstring for the size/padding rules."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dims=(64, 128, 256, 512),
                 num_heads=(2, 4, 8, 16), mlp_ratios=(4, 4, 4, 4), qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0., proj_drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=(2, 2, 20, 2), sr_ratios=(8, 4, 2, 1),
                 wss=(7, 7, 7, 7), c_ratios=(1.25, 1.25, 1.25, 1), plain_head: bool = False,
                 head_hidden_size: int = 4096, fused_attn: bool = True):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.img_size = to_2tuple(img_size)
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.wss = tuple(wss)
        self.num_features = self.embed_dims[-1]
        self.plain_head = plain_head
        self.head_hidden_size = self.num_features if plain_head else head_hidden_size
        self.grad_checkpointing = False

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        cur = 0
        self.patch_embeds = nn.ModuleList()
        self.pos_block = nn.ModuleList()
        self.pos_drops = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.feature_info = []
        for k in range(len(depths)):
            if k == 0:
                self.patch_embeds.append(ConvPatchEmbed(patch_size, in_chans, embed_dims[0], 3, norm_layer))
            else:
                self.patch_embeds.append(ConvPatchEmbed(2, embed_dims[k - 1], embed_dims[k], 1, norm_layer))
            self.pos_block.append(PosConv(embed_dims[k], embed_dims[k]))
            self.pos_drops.append(nn.Dropout(p=proj_drop_rate))
            self.stages.append(nn.ModuleList([
                ScalableViTBlock(embed_dims[k], num_heads[k], mlp_ratios[k], qkv_bias, proj_drop_rate,
                                 attn_drop_rate, dpr[cur + i], norm_layer=norm_layer, sr_ratio=sr_ratios[k],
                                 ws=1 if i % 2 == 1 else wss[k], c_ratio=c_ratios[k], fused_attn=fused_attn)
                for i in range(depths[k])]))
            cur += depths[k]
            self.feature_info.append(dict(num_chs=embed_dims[k], reduction=patch_size * 2 ** k,
                                          module=f"stages.{k}"))
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        if plain_head:
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.head = nn.Sequential(
                nn.Linear(self.num_features, head_hidden_size, bias=True),
                norm_layer(head_hidden_size),
                nn.GELU(),
                nn.Linear(head_hidden_size, num_classes) if num_classes > 0 else nn.Identity(),
            )
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
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm API --------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_block." + n for n, _ in self.pos_block.named_parameters()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^patch_embeds\.0\.",
            blocks=[
                (r"^patch_embeds\.(\d+)", (0,)),
                (r"^pos_block\.(\d+)", (0,)),
                (r"^stages\.(\d+)", None) if coarse else (r"^stages\.(\d+)\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head if self.plain_head else self.head[3]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        if self.plain_head:
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.head[3] = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        if h % 32 or w % 32 or h < 32 or w < 32:
            raise ValueError(f"ScalableViT needs H and W to be positive multiples of 32 "
                             f"(stem stride 4, three stride-2 embeddings, SSA reductions); got {h}x{w}")

    def _stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``k``: NCHW input map -> channels-last ``[B, H, W, C]`` output of its last block."""
        x = self.pos_drops[k](self.patch_embeds[k](x))
        for j, blk in enumerate(self.stages[k]):
            if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if j == 0:
                x = self.pos_block[k](x)                                   # PEG after the first block
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed last-stage map, channels-last ``[B, H/32, W/32, C]``."""
        self._check_input(x)
        for k in range(len(self.stages)):
            x = self._stage(k, x)
            if k < len(self.stages) - 1:
                x = x.permute(0, 3, 1, 2)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        if pre_logits:
            return x if self.plain_head else self.head[:3](x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (after the last block of each stage) as NCHW (or NHWC) maps.

        ``norm=True`` applies the final LayerNorm to the last stage's map.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if (stop_early or intermediates_only) else len(self.stages) - 1
        intermediates = []
        for k in range(last + 1):
            x = self._stage(k, x)
            fmap = x
            if norm and k == len(self.stages) - 1:
                fmap = self.norm(fmap)
            if k in take_indices:
                intermediates.append(fmap.permute(0, 3, 1, 2) if output_fmt == "NCHW" else fmap)
            if k < len(self.stages) - 1:
                x = x.permute(0, 3, 1, 2)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        for mods in (self.stages, self.patch_embeds, self.pos_block, self.pos_drops):
            del mods[max_index + 1:]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.plain_head = True
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take_indices


# --------------------------------------------------------------------------------------------------
# checkpoint conversion
# --------------------------------------------------------------------------------------------------



def checkpoint_filter_fn(state_dict: dict, model: ScalableViT) -> dict:
    """Released ScalableViT checkpoint -> this model's state dict.

    Accepts the wrappers ``model`` / ``module`` / ``state_dict`` / ``model_ema`` and the ``module.`` prefix.
    Names and shapes are the release's and nothing depends on the input size or window, so no resizing
    is needed (a 224 checkpoint loads into a ``*_384`` model unchanged).
    """
    return dict(unwrap_state_dict(state_dict))


def release_state_dict(state_dict: dict, model: ScalableViT, include_head: bool = True) -> dict:
    """Our ScalableViT weights -> the release's ``ScalableViT.state_dict()``, the inverse of
    :func:`checkpoint_filter_fn`: names, order and shapes are the release's already. Without the head
    the classifier ``head.3`` is left out; the pre-logits ``head.0`` / ``head.1`` (Linear, LayerNorm) stay,
    as in this model with ``num_classes=0``."""
    return {k: v for k, v in state_dict.items() if include_head or not k.startswith("head.3.")}


register_release_layout(ScalableViT, ReleaseLayout(
    container="model", state_dict_fn=release_state_dict,
    source="Yangr116/ScalableViT image_classification/main.py main() (utils.save_on_master({'model': "
           "model_without_ddp.state_dict(), ...}))",
))


register_family("scalable_vit", ScalableViT, checkpoint_filter_fn)


def _create_scalable_vit(variant: str, pretrained: bool = False, **kwargs) -> ScalableViT:
    return build_model_with_cfg(
        ScalableViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs)


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embeds.0.proj", "classifier": "head.3",
        "paper_ids": "arXiv:2203.10790",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "scalable_vit_small_224.untrained": _cfg(),
    "scalable_vit_base_224.untrained": _cfg(),
    "scalable_vit_large_224.untrained": _cfg(),
    "scalable_vit_small_384.untrained": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    "scalable_vit_base_384.untrained": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    "scalable_vit_large_384.untrained": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})

_SMALL = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 20, 2),
              c_ratios=(1.25, 1.25, 1.25, 1), drop_path_rate=0.2)
_BASE = dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 14, 6),
             c_ratios=(2, 1.25, 1.25, 1), drop_path_rate=0.5)
_LARGE = dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 6, 12, 4),
              c_ratios=(0.25, 0.5, 1, 1), drop_path_rate=0.5)
_W384 = dict(img_size=384, wss=(12, 12, 12, 12))


@register_model
def scalable_vit_small_224(pretrained=False, **kwargs) -> ScalableViT:
    return _create_scalable_vit("scalable_vit_small_224", pretrained, **{**_SMALL, **kwargs})


@register_model
def scalable_vit_base_224(pretrained=False, **kwargs) -> ScalableViT:
    return _create_scalable_vit("scalable_vit_base_224", pretrained, **{**_BASE, **kwargs})


@register_model
def scalable_vit_large_224(pretrained=False, **kwargs) -> ScalableViT:
    return _create_scalable_vit("scalable_vit_large_224", pretrained, **{**_LARGE, **kwargs})


@register_model
def scalable_vit_small_384(pretrained=False, **kwargs) -> ScalableViT:
    return _create_scalable_vit("scalable_vit_small_384", pretrained, **{**_SMALL, **_W384, **kwargs})


@register_model
def scalable_vit_base_384(pretrained=False, **kwargs) -> ScalableViT:
    return _create_scalable_vit("scalable_vit_base_384", pretrained, **{**_BASE, **_W384, **kwargs})


@register_model
def scalable_vit_large_384(pretrained=False, **kwargs) -> ScalableViT:
    return _create_scalable_vit("scalable_vit_large_384", pretrained, **{**_LARGE, **_W384, **kwargs})
