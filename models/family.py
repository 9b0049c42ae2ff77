"""One explicit registry of what each backbone family knows about its weights.

A family registers its model class with its ``checkpoint_filter_fn`` (the timm pretrained filter: key
renames, tied duplicates, resolution surgery). Weight loading, finetune surgery, evaluation and export
find the filter here from a built model instead of guessing it from the class's module or a signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: type
    filter_fn: Callable  # (state_dict, model, **kw) -> state_dict that loads strictly into model
    interp_arg: Optional[str] = None  # keyword of filter_fn choosing the rel-pos table interpolation
    default_interp: Optional[str] = None  # the family's default for it (what its release used)


_FAMILIES: dict[type, Family] = {}


def register_family(name: str, model_cls: type, filter_fn: Callable, interp_arg: Optional[str] = None,
                    default_interp: Optional[str] = None) -> Family:
    fam = Family(name, model_cls, filter_fn, interp_arg, default_interp)
    _FAMILIES[model_cls] = fam
    return fam


def base_model(model: nn.Module) -> nn.Module:
    """The family model behind wrappers (DeepSpeed/DDP ``.module``, timm ``FeatureGetterNet.model``)."""
    for _ in range(4):
        if type(model) in _FAMILIES:
            return model
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def family_of(model: nn.Module) -> Optional[Family]:
    """The registered family of ``model`` (or of the model it wraps), None for foreign models."""
    return _FAMILIES.get(type(base_model(model)))


def families() -> list[Family]:
    return list(_FAMILIES.values())


# ----------------------------------------------------------------------------------- released layouts

@dataclass(frozen=True)
class ReleaseLayout:
    """How a family's own release stores its weights, so exports drop into the papers' code unchanged.

    ``state_dict_fn(state_dict, model, include_head=True)`` is the inverse of the family's filter: our
    keys -> the release's ``state_dict()`` (its names, order, tied copies and index buffers). The
    checkpoint file is ``{container: release_state_dict, **container_extra}`` as the release's training
    script saves it. ``d2_fn(release_sd, model, **kw)`` (families whose papers ship detectron2 code)
    returns what the release's own detectron2 converter writes, for the detection backbone
    ``d2_target_fn(model, **kw)`` when that differs from the classifier. ``source`` / ``d2_source`` name the
    release code these were read from.
    """
    container: str
    state_dict_fn: Callable
    source: str
    container_extra: tuple = ()  # (key, value) pairs the release's loader needs next to the weights
    d2_fn: Optional[Callable] = None
    d2_source: Optional[str] = None
    d2_target_fn: Optional[Callable] = None  # (model, **kw) -> the detection backbone d2_fn targets, when it
    #                                          differs from the classifier (on the meta device); None: the model


_RELEASES: dict[type, ReleaseLayout] = {}


def register_release_layout(model_cls: type, layout: ReleaseLayout) -> ReleaseLayout:
    _RELEASES[model_cls] = layout
    return layout


def release_layout_of(model: nn.Module) -> Optional[ReleaseLayout]:
    """The released checkpoint layout of ``model``'s family (None for foreign models)."""
    return _RELEASES.get(type(base_model(model)))
