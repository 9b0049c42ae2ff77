"""Unwrapping released checkpoint files, shared by every family's ``checkpoint_filter_fn``.

Training scripts save ``{'model': state_dict, 'optimizer': ..., 'model_ema': ...}`` (DeiT/Swin style),
``{'state_dict': ...}`` (mmcv style), ``{'module': ...}`` (DeepSpeed) or ``{'net': ..., 'arch': ...}`` (the ViL
release's ``Checkpointer``), and DataParallel/DDP prefix every key
with ``module.``. timm's own ``clean_state_dict`` only strips the prefix, hence this small helper.
"""
from __future__ import annotations

WRAPPER_KEYS = ("model", "module", "state_dict", "model_ema", "net")


def unwrap_state_dict(state_dict: dict, wrapper_keys: tuple = WRAPPER_KEYS) -> dict:
    """Descend into the first wrapper entry present (repeatedly), then strip a ``module.`` prefix."""
    while isinstance(state_dict, dict):
        inner = next((state_dict[k] for k in wrapper_keys if isinstance(state_dict.get(k), dict)), None)
        if inner is None:
            break
        state_dict = inner
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict
