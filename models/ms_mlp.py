"""MS-MLP (Mixing and Shifting), MS-MLP-T/S/B, following the released code (JegZheng/MS-MLP).

"Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs", Huangjie Zheng, Pengcheng He,
Weizhu Chen and Mingyuan Zhou (arXiv 2202.06510).

The released code (what its checkpoints need; side by side with the paper in docs/models.md) differs from
the paper's text, and this module follows the code:

* Block: ONE residual, ``x + DropPath(gamma * MLP(LN(mix_shift(x))))`` with layer scale gamma (init 1e-6),
  not the paper's two pre-norm residuals (Eq. 1).
* Mix-shift: channels split into 5 groups with ``torch.chunk`` (four of ceil(C/5) and the remainder, e.g.
  96 → 20,20,20,20,16); group n is rolled *circularly* by shift [-2,-1,0,1,2][n] and then mixed by its own
  depth-wise r_n x r_n conv (zero padding r_n//2); this is done along W ("lr") and along H ("td") with
  separate weights and the two results are summed. Region sizes per stage:
  [[1,1,3,5,7],[1,3,3,5,7],[1,5,5,5,7],[1,7,7,7,7]]. (Paper: shifts [0..4], mix then shift.)
* Stem: 4x4 s4 conv + LN; downsampling: 2x2 s2 conv + LN (the release places it at the end of stages 1-3;
  here it starts stages 2-4, the same computation). Head: global average pool → LN → Linear.
* Drop-path rates of the release configs: T 0.1, S 0.4, B 0.5 (paper: 0.2/0.3/0.5); pass ``drop_path_rate``.

Speed: groups with the same kernel size are mixed by one depth-wise conv over the concatenated lr/td
inputs, and 1x1 groups are a per-channel affine map, instead of ten separate convs; the residual stream is
NCHW with channels-last memory so the LayerNorm/MLP views cost no copy; without autograd the rolls are
written straight into one buffer (with autograd they are concatenated, which back-propagates cheaper).
The function (and float64 output) is the release's.

Parameters (exactly the release): T 28,656,232 · S 50,303,752 · B 88,696,792.
MACs at 224 (``models.measure.count_macs``): 4.44 / 8.67 / 15.33 G; at 384: 13.04 / 25.47 / 45.06 G.
**The paper's FLOPs (Table 2: 4.9 / 9.0 / 16.1 G) do not match its own released code**: every standard
count of the released models (torch FlopCounterMode, fvcore) gives 4.44-4.45 / 8.67-8.69 / 15.33-15.36
GMACs, and the repo's own ``flops()`` gives less (it counts a k x k depth-wise conv as k, not k²). How the
paper counted is not stated.

Resolution: no position tables; the model runs at any input whose sides are multiples of 32 (four
stride-2^k patch convolutions must tile the image exactly so that every stage sees a whole grid; other sizes
get a clear error). The release asserts a fixed ``img_size``; this module does not. The paper has no 384
results; the ``*_384`` variants are the 224 weights run at 384 (nothing to resize).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple, trunc_normal_
from .family import ReleaseLayout, register_family, register_release_layout
from .layers.checkpoint import unwrap_state_dict
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ["MSMLP", "checkpoint_filter_fn"]

_STRIDE = 32
_SHIFT_DIST = (-2, -1, 0, 1, 2)
_MIX_SIZE = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))


# ------------------------------------------------------------------------------------------------ helpers

def _chunk_sizes(dim: int, chunks: int) -> List[int]:
    """Channel sizes of ``torch.chunk(x, chunks, dim=1)`` for ``dim`` channels."""
    size = -(-dim // chunks)
    sizes = []
    while sum(sizes) < dim:
        sizes.append(min(size, dim - sum(sizes)))
    return sizes


def _roll_into(dst: torch.Tensor, src: torch.Tensor, shift: int, dim: int) -> None:
    """``dst.copy_(torch.roll(src, shift, dim))`` without the intermediate tensor."""
    n = src.shape[dim]
    shift %= n
    if shift == 0:
        dst.copy_(src)
        return
    dst.narrow(dim, shift, n - shift).copy_(src.narrow(dim, 0, n - shift))
    dst.narrow(dim, 0, shift).copy_(src.narrow(dim, n - shift, shift))


# ----------------------------------------------------------------------------------------------- modules

class PatchEmbed(nn.Module):
    """k x k stride-k conv + LayerNorm(eps 1e-6) over channels. NCHW in, NCHW out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        # LayerNorm over channels; the result is NCHW with channels-last memory (see MixShiftBlock)
        return self.norm(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


class MixShiftBlock(nn.Module):
    """Mix-shift token mixing (lr + td) → LN → MLP → layer scale → drop-path, one residual."""

    def __init__(self, dim: int, mix_size: Sequence[int], shift_dist: Sequence[int] = _SHIFT_DIST,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        assert len(mix_size) == len(shift_dist)
        self.dim = dim
        self.shift_dist = tuple(shift_dist)
        self.mix_size = tuple(mix_size)
        self.chunk_sizes = _chunk_sizes(dim, len(shift_dist))
        assert len(self.chunk_sizes) == len(shift_dist), f"dim {dim} cannot be chunked into {len(shift_dist)}"
        self.dwconv_lr = nn.ModuleList([
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c) for c, k in zip(self.chunk_sizes, mix_size)])
        self.dwconv_td = nn.ModuleList([
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c) for c, k in zip(self.chunk_sizes, mix_size)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        # runs of consecutive groups with the same kernel size: (kernel, first group, end group, c0, c1)
        self._runs = []
        self._starts = starts = [sum(self.chunk_sizes[:i]) for i in range(len(self.chunk_sizes) + 1)]
        g = 0
        while g < len(mix_size):
            e = g
            while e + 1 < len(mix_size) and mix_size[e + 1] == mix_size[g]:
                e += 1
            self._runs.append((mix_size[g], g, e + 1, starts[g], starts[e + 1]))
            g = e + 1

    def mix_shift(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over directions d∈{W (lr), H (td)} of dwconv_d[n](roll(x_n, shift_n, d)), groups concatenated.

        Returns the mixed map channels-last, (B, H, W, C) contiguous, ready for the LayerNorm/MLP. Without
        autograd the rolls and results are written into preallocated buffers; with autograd they are
        concatenated out of place (slice assignments would make the backward clone whole buffers)."""
        B, C, H, W = x.shape
        inplace = not (torch.is_grad_enabled() and (x.requires_grad or self.gamma.requires_grad))
        out = x.new_empty(B, H, W, C) if inplace else None
        pieces = []
        for k, g0, g1, c0, c1 in self._runs:
            groups = range(g0, g1)
            if k == 1:
                # 1x1 depth-wise convs: a per-channel affine map of the rolled input
                for g in groups:
                    a, b = self._starts[g], self._starts[g + 1]
                    xg, s = x[:, a:b], self.shift_dist[g]
                    lr, td = self.dwconv_lr[g], self.dwconv_td[g]
                    yl = torch.roll(xg, s, 3) * lr.weight.view(1, -1, 1, 1) + lr.bias.view(1, -1, 1, 1)
                    yt = torch.roll(xg, s, 2) * td.weight.view(1, -1, 1, 1) + td.bias.view(1, -1, 1, 1)
                    y = (yl + yt).permute(0, 2, 3, 1)
                    if inplace:
                        out[..., a:b] = y
                    else:
                        pieces.append(y)
                continue
            c = c1 - c0
            if inplace:
                buf = torch.empty(B, 2 * c, H, W, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
                for g in groups:
                    a, b = self._starts[g], self._starts[g + 1]
                    s = self.shift_dist[g]
                    _roll_into(buf[:, a - c0:b - c0], x[:, a:b], s, 3)
                    _roll_into(buf[:, c + a - c0:c + b - c0], x[:, a:b], s, 2)
            else:
                xs = [(x[:, self._starts[g]:self._starts[g + 1]], self.shift_dist[g]) for g in groups]
                buf = torch.cat([torch.roll(xg, s, 3) for xg, s in xs] + [torch.roll(xg, s, 2) for xg, s in xs], 1)
            weight = torch.cat([self.dwconv_lr[g].weight for g in groups] + [self.dwconv_td[g].weight for g in groups])
            bias = torch.cat([self.dwconv_lr[g].bias for g in groups] + [self.dwconv_td[g].bias for g in groups])
            y = F.conv2d(buf, weight, bias, padding=k // 2, groups=2 * c)
            y = (y[:, :c] + y[:, c:]).permute(0, 2, 3, 1)
            if inplace:
                out[..., c0:c1] = y
            else:
                pieces.append(y)
        return out if inplace else torch.cat(pieces, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the residual stream is NCHW with channels-last memory, so the (B, H, W, C) views below are free
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.mix_shift(x)))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class MSMLPStage(nn.Module):
    def __init__(self, dim: int, depth: int, mix_size: Sequence[int], downsample: Optional[nn.Module],
                 mlp_ratio: float, drop_path: List[float], shift_dist: Sequence[int] = _SHIFT_DIST):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList([
            MixShiftBlock(dim, mix_size, shift_dist, mlp_ratio, drop_path[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


# -------------------------------------------------------------------------------------------------- model

class MSMLP(nn.Module):
    """MS-MLP. ``forward_features`` returns the last stage's NCHW map (stride 32, before the pooled norm)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (3, 3, 9, 3),
            shift_dist: Sequence[int] = _SHIFT_DIST,
            mix_size: Sequence[Sequence[int]] = _MIX_SIZE,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
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
        num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = PatchEmbed(in_chans, embed_dim, 4)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            down = PatchEmbed(dims[i - 1], dims[i], 2) if i > 0 else None
            self.stages.append(MSMLPStage(dims[i], depths[i], mix_size[i], down, mlp_ratio, dpr[i], shift_dist))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # applied after pooling (release)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # release: Linear trunc_normal(0.02) + zero bias; convs keep PyTorch's default init; LN 1/0
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()  # no tokens / tables; 1-D params (norms, biases, gamma) are excluded by the optimizer's rule

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
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
            raise ValueError(f"MS-MLP needs input sides that are multiples of {_STRIDE} (a 4x4 patch stem and three "
                             f"2x2 patch merges must tile the image); got {H}x{W}.")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW, after each stage's last block). The final norm acts on pooled features, so
        ``norm`` has no map to apply to and is ignored."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        self._check_size(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = self.norm(x.mean(dim=(2, 3)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -------------------------------------------------------------------------------------- checkpoint filter




def _remap_key(k: str) -> str:
    """Release key → this module's key (idempotent on keys already in this module's layout)."""
    k = re.sub(r"^patch_embed\.", "stem.", k)
    k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.", k)
    k = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", k)
    return k


def checkpoint_filter_fn(state_dict: dict, model: MSMLP) -> dict:
    """Released MS-MLP checkpoint → this model's state dict.

    Accepts wrapper dicts (``model``, ``module``, ``state_dict``, ``model_ema``) and the ``module.`` prefix;
    every source key is consumed (renamed) or the call fails, shapes are checked. Nothing depends on the
    input size, so a 224 checkpoint loads unchanged into a 384 model. A head / final norm / stage the model
    no longer has (features_only) is dropped.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        nk = _remap_key(k)
        if nk not in target:
            if nk.startswith("head.") and not any(t.startswith("head.") for t in target):
                continue
            if nk.startswith("norm.") and not any(t.startswith("norm.") for t in target):
                continue
            stage = re.match(r"^stages\.(\d+)\.", nk)
            if stage and int(stage.group(1)) >= len(model.stages):
                continue
            raise KeyError(f"MS-MLP checkpoint_filter_fn: unexpected key {k!r} (mapped to {nk!r})")
        if tuple(v.shape) != tuple(target[nk].shape):
            raise ValueError(f"MS-MLP checkpoint_filter_fn: {k!r} has shape {tuple(v.shape)}, the model "
                             f"expects {tuple(target[nk].shape)} for {nk!r}")
        out[nk] = v
    return out


def _release_key(k: str) -> str:
    """Inverse of :func:`_remap_key`: this module's key -> the release's."""
    k = re.sub(r"^stem\.", "patch_embed.", k)
    k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
    return re.sub(r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks.", k)


def release_state_dict(state_dict: dict, model: MSMLP, include_head: bool = True) -> dict:
    """Our MS-MLP weights -> the release's ``MS_MLP.state_dict()``, the inverse of :func:`checkpoint_filter_fn`.
    The order is already the release's: its stage-``i`` PatchMerging (``layers.i.downsample``, at the end of
    stage ``i``) is our ``stages.{i+1}.downsample``, at the start of the next stage."""
    return {_release_key(k): v for k, v in state_dict.items() if include_head or not k.startswith("head.")}


register_release_layout(MSMLP, ReleaseLayout(
    container="model", state_dict_fn=release_state_dict,
    source="JegZheng/MS-MLP utils.py save_checkpoint ({'model': model_without_ddp.state_dict(), ...})",
))


# ------------------------------------------------------------------------------------------------ builders

register_family("ms_mlp", MSMLP, checkpoint_filter_fn)


def _create_ms_mlp(variant: str, pretrained: bool = False, **kwargs) -> MSMLP:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        MSMLP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head",
        "paper_ids": "arXiv:2202.06510", "origin_url": "https://github.com/JegZheng/MS-MLP",
        **kwargs,
    }


# 224: the release's eval is Resize(256) + CenterCrop(224), bicubic (crop_pct 0.875). The release has no 384
# recipe; 384 uses crop_pct 1.0 (resize 384 + center crop), the Swin-style convention its code base follows.
_CFG_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    "ms_mlp_tiny_224.in1k": _cfg(),
    "ms_mlp_tiny_384.in1k": _cfg(**_CFG_384),
    "ms_mlp_small_224.in1k": _cfg(),
    "ms_mlp_small_384.in1k": _cfg(**_CFG_384),
    "ms_mlp_base_224.in1k": _cfg(),
    "ms_mlp_base_384.in1k": _cfg(**_CFG_384),
})

_TINY = dict(embed_dim=96, depths=(3, 3, 9, 3))
_SMALL = dict(embed_dim=96, depths=(3, 3, 27, 3))
_BASE = dict(embed_dim=128, depths=(3, 3, 27, 3))


@register_model
def ms_mlp_tiny_224(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_ms_mlp("ms_mlp_tiny_224", pretrained, **dict(_TINY, **kwargs))


@register_model
def ms_mlp_tiny_384(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_ms_mlp("ms_mlp_tiny_384", pretrained, **dict(_TINY, **kwargs))


@register_model
def ms_mlp_small_224(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_ms_mlp("ms_mlp_small_224", pretrained, **dict(_SMALL, **kwargs))


@register_model
def ms_mlp_small_384(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_ms_mlp("ms_mlp_small_384", pretrained, **dict(_SMALL, **kwargs))


@register_model
def ms_mlp_base_224(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_ms_mlp("ms_mlp_base_224", pretrained, **dict(_BASE, **kwargs))


@register_model
def ms_mlp_base_384(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_ms_mlp("ms_mlp_base_384", pretrained, **dict(_BASE, **kwargs))
