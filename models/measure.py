"""Model measurements shared by tests, benchmarks and MFU logging.

``count_macs`` runs one forward under torch's ``FlopCounterMode`` on the meta device where possible and
halves the FLOPs: the papers' "FLOPs" are multiply-accumulates. Modules whose efficient implementation
computes more (or fewer) products than the paper's convention counts (e.g. ViL's local attention, which
is reported as *valid* query-key pairs only) expose ``macs_adjustment(input_shape) -> int`` and are
corrected by that amount; the hook is recorded per call during the same forward.

``F.scaled_dot_product_attention`` on CPU dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which torch 2.13's ``FlopCounterMode`` has no formula for (the families using SDPA would report no
attention MACs on CPU). Importing this module registers the formula torch uses for the CUDA flash kernel
(the same two batched matmuls), once, without replacing an existing registration.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode


_aten = torch.ops.aten


def _register_cpu_sdpa_flops() -> None:
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


_register_cpu_sdpa_flops()


def count_params(model: torch.nn.Module) -> int:
    """Parameters counted once each (tied parameters, e.g. ViL's ``*_global`` projections, once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_zeros(model: torch.nn.Module, img_size: int | tuple[int, int] | None = None, batch: int = 1):
    """One forward of ``batch`` zero images of ``img_size`` (default: the model's) in eval mode, no_grad, on the
    model's device and dtype, its training mode restored after: what :func:`count_macs` counts, and how a size
    the model's own input checks refuse (their ``ValueError``) is found before a run or a benchmark starts."""
    if img_size is None:
        img_size = model.pretrained_cfg["input_size"][-2:] if hasattr(model, "pretrained_cfg") else 224
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        return model(torch.zeros(batch, 3, *img_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)


def count_macs(model: torch.nn.Module, img_size: int | tuple[int, int] | None = None, batch: int = 1) -> int:
    """Multiply-accumulates of one forward for ``batch`` images of ``img_size`` (default: model's)."""
    adjustments = []

    def _hook(module, args, _out):
        adjustments.append(module.macs_adjustment(tuple(args[0].shape)))

    handles = [m.register_forward_hook(_hook) for m in model.modules() if hasattr(m, "macs_adjustment")]
    try:
        with FlopCounterMode(display=False) as counter:
            forward_zeros(model, img_size, batch)
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops() // 2 + int(sum(adjustments))
