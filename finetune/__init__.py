"""Finetuning and export: pretrained weights in, adapted / downstream weights out.

* :mod:`finetune.sources`  -- ``load_state_dict(path, ema=False)``: run dir, DeepSpeed ZeRO checkpoint (any
  stage, consolidated by DeepSpeed's own tool), fp32 / safetensors file, released checkpoint.
* :mod:`finetune.surgery`  -- ``adapt_state_dict(sd, model, head=, bias_interp=, ...)`` (resolution surgery by
  the family's ``checkpoint_filter_fn``, head keep / reinit / map21k) and ``load_init_weights(model, cfg,
  label_space)``, the engine's hook for ``finetune.init``.
* ``python -m finetune``   -- the finetune entry (recipes in ``finetune/configs/``), same engine as pretraining.
* ``python -m finetune.export`` -- timm / mmdet(mmseg) / detectron2 exports, each verified by reloading.
"""
from .sources import load_state_dict  # noqa: F401
from .surgery import adapt_state_dict, load_init_weights  # noqa: F401

__all__ = ["load_state_dict", "adapt_state_dict", "load_init_weights"]
