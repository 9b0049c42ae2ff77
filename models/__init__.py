"""Backbones of the five families, registered with timm on import (``import models``)."""
from . import ms_mlp, msg_transformer, restv2, scalable_vit, vil  # noqa: F401  (registers with timm)
from .measure import count_macs, count_params

__all__ = ["count_macs", "count_params"]
