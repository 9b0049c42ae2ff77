"""Window partition with zero padding to the window grid, and its inverse (crop back).

Shared by window-attention families (MSG-Transformer, ScalableViT's IWSA) and ViL's chunked attention.
Layouts are channels-last ``[B, H, W, C]`` like timm's Swin; padding goes on the bottom/right, as in
Swin and MSG's detection code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``[B, H, W, C]`` at the bottom/right so H, W are multiples of ``window``.

    Returns the padded tensor and the ``(pad_h, pad_w)`` that was added.
    """
    _, h, w, _ = x.shape
    pad_h = (window[0] - h % window[0]) % window[0]
    pad_w = (window[1] - w % window[1]) % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of the window) -> ``[B * nWh * nWw, wh * ww, C]``."""
    b, h, w, c = x.shape
    wh, ww = window
    if h % wh or w % ww:
        raise ValueError(f"feature map {h}x{w} does not tile into {wh}x{ww} windows; pad_to_multiple first")
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, wh * ww, C]`` -> ``[B, H, W, C]``."""
    wh, ww = window
    h, w = size
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)
