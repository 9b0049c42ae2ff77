"""Positional encoding generator (PEG, CPVT: https://arxiv.org/abs/2102.10882).

A depthwise 3x3 convolution over the token map added back as a residual; its zero padding lets the
network infer absolute position. Used by ScalableViT after the first block of every stage; any family
can use it. Parameter names follow the releases (``proj.0.weight``/``proj.0.bias``).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PosConv(nn.Module):
    """PEG on channels-last maps ``[B, H, W, C]`` -> ``[B, H, W, C]``: ``x + DWConv3x3(x)`` (stride 1)."""

    def __init__(self, in_chans: int, embed_dim: int | None = None, stride: int = 1):
        super().__init__()
        embed_dim = embed_dim or in_chans
        self.proj = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 3, stride, 1, bias=True, groups=embed_dim))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = x.permute(0, 3, 1, 2)
        out = self.proj(feat)
        if self.stride == 1:
            out = out + feat
        return out.permute(0, 2, 3, 1)
