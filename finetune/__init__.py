"""Finetuning and export: the recipes in ``finetune/configs/``, ``python -m finetune`` and
``python -m finetune.export``.

* ``python -m finetune``        -- the finetune entry: the same :class:`pretrain.trainer.Trainer` as
  pretraining, starting from ``finetune.init=`` (weights read by :mod:`pretrain.weights`, adapted by
  :mod:`pretrain.surgery`: resolution surgery through the family's registered filter, head keep /
  reinit / map21k).
* ``python -m finetune.export`` -- timm, the papers' own release layouts (``release``) and their
  detectron2 converters' output (``release-d2``), each verified by reloading.
"""
