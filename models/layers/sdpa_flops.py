"""Teach ``torch.utils.flop_counter`` the CPU fused attention kernel.

``F.scaled_dot_product_attention`` on CPU dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which ``FlopCounterMode`` (torch 2.13) has no formula for, so a model using SDPA would report no attention
MACs on CPU (on the meta device the op is counted). Importing this module registers the same formula torch
uses for the CUDA flash kernel (two batched matmuls, q·kᵀ and attn·v), once, without replacing an existing
registration. Models that call SDPA import it; ``models.measure.count_macs`` then agrees on CPU and meta.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter as _fc

_aten = torch.ops.aten


def _register() -> None:
    pairs = [
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
    ]
    for cpu_name, ref_name in pairs:
        cpu_op = getattr(_aten, cpu_name, None)
        ref_op = getattr(_aten, ref_name, None)
        if cpu_op is None or ref_op is None or ref_op not in _fc.flop_registry:
            continue
        if cpu_op in _fc.flop_registry:
            continue
        # same leading arguments: (query, key, value, ...) and (grad_out, query, key, value, ...)
        _fc.flop_registry[cpu_op] = _fc.flop_registry[ref_op]


_register()
