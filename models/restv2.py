"""ResT V2 (ResTv2-T/S/B/L), following the released code (wofmanaf/ResT, ``models/rest_v2.py``).

"ResT V2: Simpler, Faster and Stronger", Qing-Long Zhang and Yu-Bin Yang, NeurIPS 2022 (arXiv 2204.07366).

Architecture (released code; where it goes beyond the paper: docs/models.md):

* Conv stem, total stride 4: conv3x3 s2 (no bias) → BN → ReLU → conv3x3 s2 (no bias) → BN → ReLU →
  conv1x1 → PA → LayerNorm(eps 1e-6). PA (pixel attention) is ``x * sigmoid(dwconv3x3(x))``.
* Patch embedding before stages 2-4: conv3x3 s2 → PA → LayerNorm.
* Pre-norm blocks (no layer scale): ``x + EMSAv2(LN(x))``, ``x + MLP(LN(x))`` (MLP ratio 4, exact GELU).
* EMSAv2 with spatial reduction r = 8, 4, 2, 1: q from all tokens; for r > 1 the tokens are reduced by a
  depth-wise conv (kernel r+1, stride r, padding r//2) + LN; k and v share one ``kv`` projection.
  Softmax attention, plus the up branch on V: depth-wise 3x3 conv C → r²C, pixel-shuffle(r), LN,
  added to the attention output *before* the output projection.
* Head: final LN on the tokens → global average pool → Linear.
* Detection-style per-stage output norms (channels-first LayerNorm, eps 1e-6; the release's detectron2
  backbone calls them ``norm_{1..4}``) exist only when the model is built with ``features_only=True``;
  they are not part of the classification model or its parameter count.

Input sides must be multiples of 32: the K/V grid of every stage is (H/32)x(W/32) and the up branch reshapes
V with ``H // r`` (what the release and its detectron2 ``size_divisibility = 32`` require). There are no
position tables, so 224-trained weights run unchanged at 384 or any multiple of 32.

Parameters (exactly the release): T 30,434,776 · S 41,205,976 · B 55,965,208 · L 86,532,520.
MACs (``models.measure.count_macs``, attention matmuls included): 224: 4.08/5.95/7.86/13.80 G;
384: 12.63/18.38/24.25/42.29 G (paper Table 1: 4.1/6.0/7.9/13.8 and 12.7/18.4/24.3/42.4 G; Table 9's
4.0/5.8/7.7/13.5 G are the same counts without the attention matmuls).

Evaluation preprocessing of the release: bicubic, crop_pct 1.0 at 224 (resize 224 + center crop 224);
at 384 the image is squashed to 384x384 with no crop (``crop_mode='squash'``).
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .family import ReleaseLayout, register_family, register_release_layout
from .layers.checkpoint import unwrap_state_dict


__all__ = ["ResTV2", "checkpoint_filter_fn"]

_STRIDE = 32


# ----------------------------------------------------------------------------------------------- modules

class PixelAttention(nn.Module):
    """PA: ``x * sigmoid(DWConv3x3(x))`` (ResTv2 App. E, Eq. 5; 3x3 depth-wise conv with bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.pa_conv(x))


class ConvStem(nn.Module):
    """conv3x3 s2 → BN → ReLU → conv3x3 s2 → BN → ReLU → conv1x1 → PA → LN. NCHW in, tokens (B, N, C) out."""

    def __init__(self, in_chans: int = 3, out_chans: int = 96):
        super().__init__()
        mid = out_chans // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, mid, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_chans, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_chans, out_chans, kernel_size=1, stride=1),
        )
        self.pos = PixelAttention(out_chans)
        self.norm = nn.LayerNorm(out_chans, eps=1e-6)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.pos(self.proj(x))
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class PatchEmbed(nn.Module):
    """conv3x3 s2 → PA → LN (between stages). NCHW in, tokens (B, N, C) out."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1)
        self.pos = PixelAttention(out_chans)
        self.norm = nn.LayerNorm(out_chans, eps=1e-6)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.pos(self.proj(x))
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class EMSAv2(nn.Module):
    """Efficient multi-head self-attention v2: reduced shared K/V + pixel-shuffle up branch on V."""

    def __init__(self, dim: int, num_heads: int = 1, sr_ratio: int = 1):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2,
                                groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=1e-6)
        # depth-wise 3x3, r² output maps per channel, then pixel-shuffle(r) (functional; the release
        # wraps the conv in nn.Sequential, hence its key ``up.0``)
        self.up = nn.Conv2d(dim, sr_ratio * sr_ratio * dim, kernel_size=3, padding=1, groups=dim)
        self.up_norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        h, d, r = self.num_heads, self.head_dim, self.sr_ratio
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)
        if r > 1:
            x = self.sr(x.transpose(1, 2).reshape(B, C, H, W))
            x = self.sr_norm(x.flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            # CPU training: at these shapes (few keys) the explicit matmuls back-propagate faster than
            # the CPU flash kernel; elsewhere (GPU, inference) the fused kernel is used
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        # up branch on V; channels stay head-major (the release's v.transpose(-1, -2).reshape)
        h_, w_ = H // r, W // r
        up = self.up(v.transpose(-1, -2).reshape(B, C, h_, w_))
        # pixel-shuffle(r) straight into token order (B, H*W, C): one copy instead of two
        up = up.view(B, C, r, r, h_, w_).permute(0, 4, 2, 5, 3, 1).reshape(B, N, C)
        up = self.up_norm(up)
        return self.proj(out + up)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EMSAv2(dim, num_heads=num_heads, sr_ratio=sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ResTStage(nn.Module):
    """Patch embedding (stem for stage 1) + blocks. NCHW in, NCHW out."""

    def __init__(self, downsample: nn.Module, dim: int, depth: int, num_heads: int, sr_ratio: int,
                 drop_path: List[float]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList([Block(dim, num_heads, sr_ratio, drop_path[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, H, W = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)


# -------------------------------------------------------------------------------------------------- model

class ResTV2(nn.Module):
    """ResT V2. ``forward_features`` returns the final-normed NCHW map at stride 32."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Tuple[int, ...] = (96, 192, 384, 768),
            num_heads: Tuple[int, ...] = (1, 2, 4, 8),
            depths: Tuple[int, ...] = (2, 2, 2, 2),
            sr_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            dense_norms: bool = False,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
    ):
        super().__init__()
        # No position tables: any multiple of 32 runs. img_size is accepted (and only validated) so every
        # family takes the engine's model.img_size.
        if img_size is not None:
            self._check_size(torch.empty(0, 0, *to_2tuple(img_size)))
        assert global_pool in ("avg", "")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages = []
        self.feature_info = []
        for i in range(len(depths)):
            down = ConvStem(in_chans, embed_dims[0]) if i == 0 else PatchEmbed(embed_dims[i - 1], embed_dims[i])
            stages.append(ResTStage(down, embed_dims[i], depths[i], num_heads[i], sr_ratios[i], dpr[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        # detection-style output norms (the release's detectron2 ``norm_{i}``): features_only models only
        self.out_norms = nn.ModuleList([LayerNorm2d(d, eps=1e-6) for d in embed_dims]) if dense_norms else None

        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()  # no tokens / tables; 1-D params (norms, biases) are excluded by the optimizer's rule

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stages\.0\.downsample",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^out_norms\.(\d+)", (99999,)),
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
            assert global_pool in ("avg", "")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_size(x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        if H % _STRIDE or W % _STRIDE:
            raise ValueError(
                f"ResTv2 needs input sides that are multiples of {_STRIDE} (its spatial reduction and "
                f"pixel-shuffle up branch work on an (H/32)x(W/32) grid in every stage); got {H}x{W}.")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW). With detection norms (``features_only`` models) they are normed per
        stage as in the release's detectron2 backbone; otherwise they are the raw residual stream.
        ``norm=True`` applies the final LayerNorm to the last stage's output instead."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        self._check_size(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        last_idx = len(self.stages) - 1
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                if self.out_norms is not None:
                    intermediates.append(self.out_norms[i](x))
                elif norm and i == last_idx:
                    intermediates.append(self._final_norm(x))
                else:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        if i == last_idx:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if self.out_norms is not None:
            self.out_norms = self.out_norms[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.Identity):
            return x
        B, C, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        for stage in self.stages:
            x = stage(x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -------------------------------------------------------------------------------------- checkpoint filter




def _remap_key(k: str) -> str:
    """Release key → this module's key (idempotent on keys already in this module's layout)."""
    k = re.sub(r"^stem\.", "stages.0.downsample.", k)
    k = re.sub(r"^patch_(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample.", k)
    k = re.sub(r"^stage(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", k)
    k = re.sub(r"\.attn\.up\.0\.", ".attn.up.", k)
    k = re.sub(r"^norm_(\d)\.0\.", lambda m: f"out_norms.{int(m.group(1)) - 1}.", k)  # detectron2 backbone
    return k


def checkpoint_filter_fn(state_dict: dict, model: ResTV2) -> dict:
    """Released ResTv2 checkpoint (classification or detectron2 backbone) → this model's state dict.

    Accepts wrapper dicts (``model``, ``module``, ``state_dict``, ``model_ema``) and the ``module.`` prefix.
    Every source key is consumed or the call fails. No resolution surgery is ever needed (no position
    tables): a 224 checkpoint loads unchanged into a 384 model. Keys the source cannot have are filled from
    the model: BatchNorm ``num_batches_tracked`` counters, and the detection output norms of a
    ``features_only`` model (freshly initialised) when the source is a classification checkpoint.
    A classification head in the source is dropped if the model has none (features_only / num_classes=0).
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        nk = _remap_key(k)
        if nk not in target:
            if nk.startswith("head.") and not any(t.startswith("head.") for t in target):
                continue  # head removed from the model (features_only / num_classes=0)
            if nk.startswith("norm.") and not any(t.startswith("norm.") for t in target):
                continue  # final norm pruned (features_only)
            if nk.startswith("out_norms.") and model.out_norms is None:
                continue  # detection norms, classification model
            stage = re.match(r"^(?:stages|out_norms)\.(\d+)\.", nk)
            if stage and int(stage.group(1)) >= len(model.stages):
                continue  # stage pruned away (features_only with fewer out_indices)
            raise KeyError(f"ResTv2 checkpoint_filter_fn: unexpected key {k!r} (mapped to {nk!r})")
        if tuple(v.shape) != tuple(target[nk].shape):
            raise ValueError(f"ResTv2 checkpoint_filter_fn: {k!r} has shape {tuple(v.shape)}, the model "
                             f"expects {tuple(target[nk].shape)} for {nk!r}")
        out[nk] = v
    for nk, v in target.items():
        if nk not in out and (nk.endswith("num_batches_tracked") or nk.startswith("out_norms.")):
            out[nk] = v.clone()
    return out


def _release_key(k: str) -> str:
    """Inverse of :func:`_remap_key` for a classification model: this module's key -> the release's."""
    k = re.sub(r"^stages\.0\.downsample\.", "stem.", k)
    k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_{int(m.group(1)) + 1}.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}.", k)
    return re.sub(r"\.attn\.up\.", ".attn.up.0.", k)


def _release_rank(k: str) -> int:
    """The release registers stem, patch_2..4, stage1..4, norm, head in that order."""
    m = re.match(r"^(stem|patch_(\d)|stage(\d)|norm|head)\.", k)
    if m.group(1) == "stem":
        return 0
    if m.group(2):
        return int(m.group(2)) - 1
    if m.group(3):
        return 3 + int(m.group(3))
    return 8 if m.group(1) == "norm" else 9


def release_state_dict(state_dict: dict, model: ResTV2, include_head: bool = True) -> dict:
    """Our ResTv2 weights -> the release's classification ``ResTV2.state_dict()`` (names and order), the
    inverse of :func:`checkpoint_filter_fn`. The detection output norms of a ``features_only`` model are
    not part of the classification release and are left out."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("out_norms.") or (k.startswith("head.") and not include_head):
            continue
        out[_release_key(k)] = v
    return dict(sorted(out.items(), key=lambda kv: _release_rank(kv[0])))   # stable: keeps order within groups


D2_PREFIX = "backbone.bottom_up."


def release_d2_checkpoint(release_sd: dict, model: ResTV2) -> dict:
    """What the release's ``object_detection/convert_to_d2.py`` writes for the classification weights
    ``release_sd``: every key under ``backbone.bottom_up.``, a flat dict (no container)."""
    return {D2_PREFIX + k: v for k, v in release_sd.items()}


register_release_layout(ResTV2, ReleaseLayout(
    container="model", state_dict_fn=release_state_dict,
    source="wofmanaf/ResT utils.py save_model ({'model': model_without_ddp.state_dict(), ...})",
    d2_fn=release_d2_checkpoint,
    d2_source="wofmanaf/ResT object_detection/convert_to_d2.py main() (reads checkpoint['model'], saves "
              "{'backbone.bottom_up.' + k: v})",
))


# ------------------------------------------------------------------------------------------------ builders

register_family("restv2", ResTV2, checkpoint_filter_fn)


def _create_restv2(variant: str, pretrained: bool = False, **kwargs) -> ResTV2:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs.setdefault("dense_norms", bool(kwargs.get("features_only", False)))
    return build_model_with_cfg(
        ResTV2, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.downsample.proj.0", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2204.07366", "origin_url": "https://github.com/wofmanaf/ResT",
        **kwargs,
    }


# 224: Resize(224) + CenterCrop(224), crop_pct 1.0; >= 384: squash to 384x384 without a crop (release datasets.py)
_CFG_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")

default_cfgs = generate_default_cfgs({
    "restv2_tiny_224.in1k": _cfg(),
    "restv2_tiny_384.in1k": _cfg(**_CFG_384),
    "restv2_small_224.in1k": _cfg(),
    "restv2_small_384.in1k": _cfg(**_CFG_384),
    "restv2_base_224.in1k": _cfg(),
    "restv2_base_384.in1k": _cfg(**_CFG_384),
    "restv2_large_224.in1k": _cfg(),
    "restv2_large_384.in1k": _cfg(**_CFG_384),
})

_TINY = dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 6, 2))
_SMALL = dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 12, 2))
_BASE = dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 3, 16, 3))
_LARGE = dict(embed_dims=(128, 256, 512, 1024), num_heads=(2, 4, 8, 16), depths=(2, 3, 16, 2))


@register_model
def restv2_tiny_224(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_tiny_224", pretrained, **dict(_TINY, **kwargs))


@register_model
def restv2_tiny_384(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_tiny_384", pretrained, **dict(_TINY, **kwargs))


@register_model
def restv2_small_224(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_small_224", pretrained, **dict(_SMALL, **kwargs))


@register_model
def restv2_small_384(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_small_384", pretrained, **dict(_SMALL, **kwargs))


@register_model
def restv2_base_224(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_base_224", pretrained, **dict(_BASE, **kwargs))


@register_model
def restv2_base_384(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_base_384", pretrained, **dict(_BASE, **kwargs))


@register_model
def restv2_large_224(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_large_224", pretrained, **dict(_LARGE, **kwargs))


@register_model
def restv2_large_384(pretrained: bool = False, **kwargs) -> ResTV2:
    return _create_restv2("restv2_large_384", pretrained, **dict(_LARGE, **kwargs))
