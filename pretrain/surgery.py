"""Checkpoint surgery for finetuning: a pretrained state dict -> one that loads strictly into a new model.

Two concerns, each in one place:

* **resolution / window surgery** belongs to each family: its ``checkpoint_filter_fn(state_dict, model)``
  (the timm pretrained filter, in the model's own module, registered in :mod:`models.family`) resizes
  relative-position tables, APE, etc. :func:`adapt_state_dict` calls it, passing ``bias_interp`` to the
  families whose filter interpolates tables (ViL: bilinear by default as the release, MSG: bicubic as
  Swin; None keeps the family default);
* **the classifier head** is decided here (``head=``):

  ``keep``    same label space: the checkpoint's head must have the model's shape (clear error if not);
  ``reinit``  new label space: the model's freshly initialised head is used;
  ``map21k``  a 21K classifier evaluated/finetuned on 1K without training: the rows of the 1K synsets are
              selected through the label-space map of :mod:`data.labels` (``map_21k_to_1k``), or through
              an explicit row list (``head_rows``; the ViL release's "first 1000 rows" is
              ``head_rows=range(1000)`` and is only right for a 1K-first order such as ``in22k-ms``).

:func:`load_init_weights` is what the engine calls when a finetune run starts fresh.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from data.labels import as_label_space
from models.family import base_model, family_of
from pretrain.weights import load_with_info, unwrap

_log = logging.getLogger(__name__)

HEAD_MODES = ("keep", "reinit", "map21k")
INTERP_MODES = ("bilinear", "bicubic")
# buffers a checkpoint need not carry: the model regenerates them
_REGENERATED = ("relative_position_index", "attn_mask", "num_batches_tracked", "rel_index", "coords")
# 21K-style head sizes -> the label space they most likely use (data/labels.py)
_SPACE_BY_SIZE = {21841: "in21k-fall11", 21842: "in22k-ms", 10450: "in21k-winter21", 1000: "in1k"}


class SurgeryError(ValueError):
    """The checkpoint cannot be made to fit the model (the message says what and how to fix it)."""


# ------------------------------------------------------------------------------------------ helpers

def classifier_name(model: nn.Module) -> Optional[str]:
    """Dotted name of the classifier module (``'head'``), None if the model has no classifier."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    clf = get()
    if clf is None or isinstance(clf, nn.Identity) or not list(clf.parameters()):
        return None
    for name, m in model.named_modules():
        if m is clf:
            return name
    return None


def head_row_index(num_src_rows: int, num_dst: int, src_label_space: Any = None, dst_label_space: Any = None,
                   head_rows: Optional[Sequence[int]] = None, allow_missing: bool = False) -> List[int]:
    """Rows of a source classifier that give the destination classes, in destination order.

    A destination synset missing from the source space is an error naming it, or (``allow_missing``)
    row ``-1``: the caller keeps the model's fresh row for it (finetuning learns it)."""
    if head_rows is not None:
        rows = [int(r) for r in head_rows]
    else:
        from data.labels import map_21k_to_1k
        src = src_label_space if src_label_space is not None else _SPACE_BY_SIZE.get(num_src_rows)
        if src is None:
            raise SurgeryError(f"head=map21k: cannot tell the label space of a {num_src_rows}-class head; "
                               "pass src_label_space (a builtin name, a synset file or list) or head_rows")
        dst = dst_label_space if dst_label_space is not None else ("in1k" if num_dst == 1000 else None)
        if dst is None:
            raise SurgeryError(f"head=map21k: the model has {num_dst} classes, not 1000; pass dst_label_space")
        src_ls, dst_ls = as_label_space(src), as_label_space(dst)
        if len(src_ls) != num_src_rows:
            raise SurgeryError(f"head=map21k: source label space {src_ls.name!r} has {len(src_ls)} classes but "
                               f"the checkpoint head has {num_src_rows} rows")
        if allow_missing:
            rows = [src_ls.index(syn) if syn in src_ls else -1 for syn in dst_ls.synsets]
        else:
            rows = map_21k_to_1k(src_ls, dst_ls)
    if len(rows) != num_dst:
        raise SurgeryError(f"head=map21k: {len(rows)} rows selected for a model with {num_dst} classes")
    bad = [r for r in rows if not 0 <= r < num_src_rows and not (allow_missing and r == -1)]
    if bad:
        raise SurgeryError(f"head=map21k: row indices {bad[:10]} outside the source head ({num_src_rows} rows)")
    return rows


def _same_space(a: Any, b: Any) -> Optional[bool]:
    try:
        la, lb = as_label_space(a), as_label_space(b)
    except Exception:  # noqa: BLE001 - unknown spaces cannot be compared
        return None
    if la is None or lb is None:
        return None
    return list(la.synsets) == list(lb.synsets)


# ------------------------------------------------------------------------------------------ API

def adapt_state_dict_with_report(
    state_dict: Dict[str, torch.Tensor], model: nn.Module, *, head: str = "keep",
    bias_interp: Optional[str] = None, src_label_space: Any = None, dst_label_space: Any = None,
    head_rows: Optional[Sequence[int]] = None, map21k_missing: str = "error",
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """:func:`adapt_state_dict` plus a report (what was resized, filled, how the head was set)."""
    if head not in HEAD_MODES:
        raise SurgeryError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if bias_interp is not None and bias_interp not in INTERP_MODES:
        raise SurgeryError(f"bias_interp must be one of {INTERP_MODES}, got {bias_interp!r}")
    net = base_model(model)
    target = net.state_dict()
    sd = unwrap(dict(state_dict))

    # 1. take the classifier out of the source: the head is decided below, not by the family filter
    clf = classifier_name(net)
    clf_prefix = (clf or "head") + "."
    src_head = {k[len(clf_prefix):]: v for k, v in sd.items() if k.startswith(clf_prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(clf_prefix)}

    # 2. the family's resolution / window surgery
    fam = family_of(net)
    kwargs = {fam.interp_arg: bias_interp} if fam is not None and fam.interp_arg and bias_interp else {}
    out = dict(fam.filter_fn(sd, net, **kwargs)) if fam is not None else dict(sd)
    out = {k: v for k, v in out.items() if not k.startswith(clf_prefix)}
    resized = sorted(k for k, v in out.items() if k in target and k in sd and tuple(sd[k].shape) != tuple(v.shape))

    # 3. the head
    interp_used = bias_interp if kwargs else (fam.default_interp if fam is not None else None)
    fn = fam.filter_fn if fam is not None else None
    report: Dict[str, Any] = {"head": head, "bias_interp": interp_used,
                              "family_filter": f"{fn.__module__}.{fn.__name__}" if fn else None}
    dst_keys = {k[len(clf_prefix):]: k for k in target if clf and k.startswith(clf_prefix)}
    if clf is None:
        report["head"] = "none (model has no classifier)"
    elif head == "keep":
        missing = sorted(set(dst_keys) - set(src_head))
        if missing:
            raise SurgeryError(f"head=keep but the checkpoint has no classifier ({clf_prefix}{missing[0]}); "
                               "use finetune.head=reinit")
        for s, k in dst_keys.items():
            if tuple(src_head[s].shape) != tuple(target[k].shape):
                raise SurgeryError(
                    f"head=keep: the checkpoint classifier {k} has shape {tuple(src_head[s].shape)}, the model "
                    f"expects {tuple(target[k].shape)} (different number of classes). Use finetune.head=reinit "
                    "for a new label space, or finetune.head=map21k to select the 1K rows of a 21K head")
            out[k] = src_head[s]
        same = _same_space(src_label_space, dst_label_space)
        if same is False:
            raise SurgeryError("head=keep: the checkpoint's label space differs from the training data's "
                               "(same size, different classes or order); use finetune.head=reinit or map21k")
    elif head == "reinit":
        for s, k in dst_keys.items():
            out[k] = target[k].detach().clone()
    else:  # map21k
        w_key = next((s for s in ("weight", "fc.weight") if s in src_head), None)
        if w_key is None:
            raise SurgeryError("head=map21k but the checkpoint has no classifier weight")
        num_src = src_head[w_key].shape[0]
        num_dst = target[dst_keys[w_key]].shape[0] if w_key in dst_keys else None
        if num_dst is None:
            raise SurgeryError(f"head=map21k: the model's classifier has no {w_key}")
        if map21k_missing not in ("error", "init"):
            raise SurgeryError(f"map21k_missing must be 'error' or 'init', got {map21k_missing!r}")
        rows = head_row_index(num_src, num_dst, src_label_space, dst_label_space, head_rows,
                              allow_missing=map21k_missing == "init")
        missing_rows = [i for i, r in enumerate(rows) if r < 0]
        idx = torch.as_tensor([max(r, 0) for r in rows], dtype=torch.long)
        for s, k in dst_keys.items():
            if s not in src_head:
                raise SurgeryError(f"head=map21k: the checkpoint classifier lacks {clf_prefix}{s}")
            v = src_head[s].index_select(0, idx).contiguous()
            if missing_rows:  # classes the source space lacks keep the model's fresh rows
                v[missing_rows] = target[k][missing_rows].to(v.dtype)
            out[k] = v
        report["head_rows"] = len(rows)
        report["head_rows_first_1k"] = rows == list(range(len(rows)))
        if missing_rows:
            names = []
            if dst_label_space is not None or num_dst == 1000:
                dst_ls = as_label_space(dst_label_space if dst_label_space is not None else "in1k")
                names = [dst_ls.synsets[i] for i in missing_rows]
            report["head_rows_fresh"] = names or missing_rows
            _log.warning("head=map21k: %d class(es) missing from the source label space keep a fresh row: %s",
                         len(missing_rows), (names or missing_rows)[:20])

    # 4. regenerated buffers the checkpoint does not carry (index tables, BN counters)
    filled = []
    buffers = {n for n, _ in net.named_buffers()}
    for k, v in target.items():
        if k not in out and k in buffers and (not v.is_floating_point() or any(s in k for s in _REGENERATED)):
            out[k] = v.detach().clone()
            filled.append(k)

    # 5. refuse anything strict loading would refuse, with one message
    missing = sorted(set(target) - set(out))
    unexpected = sorted(set(out) - set(target))
    shapes = sorted(k for k in set(out) & set(target) if tuple(out[k].shape) != tuple(target[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:8]}")
        if shapes:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(out[k].shape)} vs model {tuple(target[k].shape)}" for k in shapes[:8]))
        raise SurgeryError(f"checkpoint does not fit {type(net).__name__} after surgery: " + "; ".join(parts))
    out = {k: out[k] for k in target}  # the model's order
    report.update(resized=resized, filled=filled, num_tensors=len(out))
    return out, report


def adapt_state_dict(
    state_dict: Dict[str, torch.Tensor], model: nn.Module, *, head: str = "keep",
    bias_interp: Optional[str] = None, src_label_space: Any = None, dst_label_space: Any = None,
    head_rows: Optional[Sequence[int]] = None, map21k_missing: str = "error",
) -> Dict[str, torch.Tensor]:
    """A pretrained state dict adapted to ``model``, ready for ``model.load_state_dict(strict=True)``.

    Args:
        state_dict: any source's weights (ours, a release's, wrapped or with ``module.``).
        model: the target model (built at the new resolution / window / number of classes).
        head: ``keep`` | ``reinit`` | ``map21k`` (see the module doc).
        bias_interp: ``bilinear`` | ``bicubic`` for relative-position tables; None = the family default.
        src_label_space, dst_label_space: label spaces of the checkpoint head and of the model (a
            ``data.labels.LabelSpace``, a builtin name or synset file, a list of synsets, or a manifest's
            ``label_space`` dict). ``map21k`` infers the source from the head size (21841 fall11,
            21842 1K-first, 10450 winter21) and the destination as in1k when not given.
        head_rows: explicit source rows for ``map21k`` (e.g. ``range(1000)``, the release's rule).
        map21k_missing: ``error`` (default: a destination synset missing from the source space is an error
            naming it, right for evaluation) or ``init`` (it keeps the model's fresh row; what finetuning
            uses, e.g. fall11 lacks the 1K synset n04399382).
    """
    return adapt_state_dict_with_report(state_dict, model, head=head, bias_interp=bias_interp,
                                        src_label_space=src_label_space, dst_label_space=dst_label_space,
                                        head_rows=head_rows, map21k_missing=map21k_missing)[0]


def load_init_weights(model: nn.Module, cfg, label_space: Any = None) -> Dict[str, Any]:
    """Initialise ``model`` from ``cfg.finetune.init`` (engine hook, fresh runs only; never on resume).

    Reads the source with :func:`pretrain.weights.load_with_info` (raw weights; a path to an
    ``ema.safetensors`` file picks EMA weights), adapts it with ``cfg.finetune.head`` /
    ``cfg.finetune.bias_interp`` (``map21k``: classes the source space lacks keep fresh rows, reported) and
    loads it strictly. ``label_space`` is the training data's label space
    (the manifest's ``label_space`` dict, a LabelSpace, a name, or None). Call it on the plain module
    **before** ``deepspeed.initialize`` (ZeRO-3 partitions parameters there). Returns a short report.
    """
    ft = cfg.finetune
    if not ft.init:
        return {"init": None}
    sd, src = load_with_info(ft.init)
    src_space = src.label_space
    out, report = adapt_state_dict_with_report(
        sd, model, head=ft.head, bias_interp=ft.bias_interp,
        src_label_space=src_space, dst_label_space=label_space, map21k_missing="init")
    net = base_model(model)
    result = net.load_state_dict(out, strict=True)
    report.update(init=str(ft.init), source_kind=src.kind, source_file=src.file,
                  source_model=src.model_name, strict=not (result.missing_keys or result.unexpected_keys))
    _log.info("finetune init from %s (%s): head=%s, %d tensors, resized %d", ft.init, src.kind, report["head"],
              report["num_tensors"], len(report["resized"]))
    return report
