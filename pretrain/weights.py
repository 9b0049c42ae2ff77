"""Where finetuning, evaluation and export read weights from: one function, every kind of source.

:func:`load_state_dict` accepts

* a **run directory** (``RUN/checkpoints/`` inside it, ``RUN/config.yaml`` naming the model);
* a **DeepSpeed checkpoint directory** (the folder holding ``latest`` and the tag folders) or one **tag
  folder** (``RUN/checkpoints/step_00000100``; any DeepSpeed tag name works). ZeRO stages 1-3 are consolidated to fp32 by DeepSpeed's
  own ``get_fp32_state_dict_from_zero_checkpoint`` (one process, no ``torch.distributed``); stage 0
  without ZeRO optimizer shards reads the module weights from ``mp_rank_00_model_states.pt``;
* a **timm export folder** (``model.safetensors`` + ``config.json``, written by ``python -m finetune.export``);
* a **file**: ``.safetensors``, or a torch pickle (``.pt``/``.pth``/``.bin``/``.pth.tar``) read with
  ``torch.load(weights_only=True)``: a plain state dict or a released checkpoint wrapped in ``model`` /
  ``module`` / ``state_dict`` / ``model_ema`` with or without the ``module.`` prefix.

Safety: every pickle is read weights-only (:mod:`pretrain.safeload`), DeepSpeed's files included: its
consolidation tool runs with loads forced to ``weights_only=True`` and only DeepSpeed's three checkpoint
record classes allowed. A file that asks for anything else is refused with one line (:class:`SourceError`)
and never unpickled.

EMA: the engine saves EMA weights (``train.ema > 0``) as ``ema.safetensors`` inside the checkpoint tag
folder; ``ema=True`` selects them (and a released checkpoint's ``model_ema`` entry).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from models.layers.checkpoint import unwrap_state_dict
from pretrain import safeload
from pretrain.rundir import (EMA_FILE, MODEL_STATES, CheckpointError, RunDir, check_not_partial, find_tag_dir,
                             is_tag_dir)

WRAPPER_KEYS = ("model", "module", "state_dict", "net")  # "net": the ViL release; model_ema only on request
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".ckpt")


class SourceError(ValueError):
    """A path that is not a checkpoint we can read (the message says what was expected)."""


@dataclass
class ResolvedSource:
    """What a path turned out to be (``kind``) and what was read from it."""
    path: str
    kind: str  # run | deepspeed | export | safetensors | torch
    file: str = ""  # the file / tag folder actually read
    run_dir: Optional[str] = None
    model_name: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # img_size, num_classes, kwargs of the run
    label_space: Optional[Any] = None  # name, list of synsets, or None when unknown
    ema: bool = False
    data_cfg: Dict[str, Any] = field(default_factory=dict)  # eval crop_pct / crop_mode / interpolation of the run


# ------------------------------------------------------------------------------------------ helpers

def _float_cpu(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Floating tensors to contiguous fp32 on CPU (integer buffers keep their dtype)."""
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous()
    return out


def unwrap(obj: Any, ema: bool = False) -> Dict[str, torch.Tensor]:
    """Released checkpoint -> flat ``{name: tensor}``: ``model_ema`` first with ``ema=True``, then the
    plain wrappers and the ``module.`` prefix (``models.layers.checkpoint.unwrap_state_dict``)."""
    if not isinstance(obj, dict):
        raise SourceError(f"checkpoint content is a {type(obj).__name__}, expected a dict of tensors")
    sd = obj
    if ema:
        if isinstance(sd.get("model_ema"), dict):
            sd = sd["model_ema"]
        elif any(isinstance(sd.get(k), dict) for k in WRAPPER_KEYS):
            raise SourceError("ema=True but the checkpoint has no 'model_ema' entry "
                              f"(top-level keys: {sorted(sd)[:10]})")
    sd = unwrap_state_dict(sd, WRAPPER_KEYS)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SourceError(f"no tensors found in checkpoint (top-level keys: {sorted(map(str, sd))[:10]})")
    return tensors


def _run_label_space(cfg: dict) -> Optional[Any]:
    """The training data's label space of a run (the manifest's ``label_space`` dict), or None."""
    train = (cfg.get("data") or {}).get("train")
    if not train:
        return None
    try:
        from data.shards import resolve  # optional: the data may live on another machine
        return resolve(train).label_space
    except Exception:  # noqa: BLE001 - the label space is optional metadata
        return None


@contextlib.contextmanager
def _safe(path):
    """An unsafe pickle becomes a SourceError naming the file (one line for the CLIs)."""
    try:
        yield
    except safeload.UnsafeCheckpointError as e:
        raise SourceError(str(e).replace("checkpoint: refused", f"{path}: refused", 1)) from None


def _find_tag_dir(ckpt_dir: Path) -> Path:
    try:
        return find_tag_dir(ckpt_dir)
    except CheckpointError as e:
        raise SourceError(str(e)) from None


def load_deepspeed_tag(tag_dir: Path, ema: bool = False) -> Dict[str, torch.Tensor]:
    """fp32 module weights of one DeepSpeed tag folder (any ZeRO stage), or its EMA weights."""
    tag_dir = Path(tag_dir)
    try:
        check_not_partial(tag_dir)
    except CheckpointError as e:
        raise SourceError(str(e)) from None
    if ema:
        ema_file = tag_dir / EMA_FILE
        if not ema_file.is_file():
            raise SourceError(f"ema=True but {ema_file} does not exist (was the run trained with train.ema > 0?)")
        from safetensors.torch import load_file
        return _float_cpu(load_file(str(ema_file)))
    if glob.glob(str(tag_dir / "*zero_pp_rank_*optim_states.pt")):
        # ZeRO 1-3 (and bf16 stage 0, which shards fp32 masters the same way): DeepSpeed's own tool.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with _safe(tag_dir), safeload.weights_only_loads():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return _float_cpu(sd)
    states = tag_dir / MODEL_STATES
    if not states.is_file():
        raise SourceError(f"{tag_dir}: neither ZeRO optimizer shards nor {MODEL_STATES} found")
    # stage 0: the module weights are whole in the model-states file
    with _safe(states):
        obj = safeload.load(states)
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict) or not module:
        raise SourceError(f"{states} has no 'module' weights")
    return _float_cpu(unwrap(module))


def load_file(path: str | os.PathLike, ema: bool = False) -> Dict[str, torch.Tensor]:
    """A single weights file: ``.safetensors`` or a torch pickle (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load
        return _float_cpu(unwrap(st_load(str(path)), ema=False))
    with _safe(path):
        try:
            obj = safeload.load(path)
        except safeload.UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    return _float_cpu(unwrap(obj, ema=ema))


# ------------------------------------------------------------------------------------------ API

def resolve_source(path: str | os.PathLike, ema: bool = False) -> ResolvedSource:
    """Work out what ``path`` is (without reading weights)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"checkpoint not found: {p}")
    if p.is_file():
        kind = "safetensors" if p.suffix == ".safetensors" else "torch"
        src = ResolvedSource(str(p), kind, file=str(p), ema=ema)
        cfg_json = p.parent / "config.json"
        if kind == "safetensors" and cfg_json.is_file():
            _fill_from_export(src, cfg_json)
        return src
    if RunDir.is_run_dir(p):
        run = RunDir(p)
        src = ResolvedSource(str(p), "run", file=str(_find_tag_dir(run.ckpt_dir)), run_dir=str(p), ema=ema)
        _fill_from_run(src, run.read_config())
        return src
    if (p / "model.safetensors").is_file() and not is_tag_dir(p):
        src = ResolvedSource(str(p), "export", file=str(p / "model.safetensors"), ema=ema)
        if (p / "config.json").is_file():
            _fill_from_export(src, p / "config.json")
        return src
    if is_tag_dir(p):
        tag_dir = p
    elif (p / "latest").is_file() or glob.glob(str(p / "*" / "*model_states.pt")):
        tag_dir = _find_tag_dir(p)
    else:
        raise SourceError(f"{p} is a directory but not a run directory (no checkpoints/), a DeepSpeed "
                          "checkpoint folder (no 'latest' / tag folders), a tag folder (no *model_states.pt) "
                          "or a timm export (no model.safetensors)")
    src = ResolvedSource(str(p), "deepspeed", file=str(tag_dir), ema=ema)
    # a run directory two levels up (RUN/checkpoints/TAG): take the model name from its config
    for path in (tag_dir.parent.parent, tag_dir.parent):
        run = RunDir(path)
        if run.config_file.is_file():
            src.run_dir = str(run.path)
            _fill_from_run(src, run.read_config())
            break
    return src


def _fill_from_run(src: ResolvedSource, cfg: dict) -> None:
    model = cfg.get("model") or {}
    src.model_name = model.get("name")
    src.model_kwargs = {k: model[k] for k in ("img_size", "num_classes") if model.get(k) is not None}
    if model.get("kwargs"):
        src.model_kwargs.update(model["kwargs"])
    src.label_space = _run_label_space(cfg)
    data = cfg.get("data") or {}
    if data.get("crop_pct") is not None:
        src.data_cfg["crop_pct"] = data["crop_pct"]
    if data.get("eval_crop"):
        src.data_cfg["crop_mode"] = "squash" if data["eval_crop"] == "squash" else "center"
    if data.get("interpolation"):
        src.data_cfg["interpolation"] = data["interpolation"]


def _fill_from_export(src: ResolvedSource, cfg_json: Path) -> None:
    try:
        cfg = json.loads(cfg_json.read_text())
    except (OSError, ValueError):
        return
    src.model_name = cfg.get("architecture")
    src.model_kwargs = dict(cfg.get("model_args") or {})
    if cfg.get("num_classes") is not None:
        src.model_kwargs.setdefault("num_classes", cfg["num_classes"])
    src.label_space = cfg.get("label_space") or cfg.get("label_names")


def load_resolved(src: ResolvedSource) -> Dict[str, torch.Tensor]:
    if src.kind in ("run", "deepspeed"):
        return load_deepspeed_tag(Path(src.file), ema=src.ema)
    if src.kind == "export" and src.ema:
        raise SourceError(f"{src.path} is an export; it holds one set of weights (choose EMA at export time)")
    return load_file(src.file, ema=src.ema)


def load_state_dict(path: str | os.PathLike, ema: bool = False) -> Dict[str, torch.Tensor]:
    """Weights of any supported source as ``{name: tensor}`` (floats as fp32, all on CPU).

    The keys are those of the saved module (ours, or a release's own naming: the family's
    ``checkpoint_filter_fn`` maps them); the ``module.`` prefix and checkpoint wrappers are removed.
    """
    return load_resolved(resolve_source(path, ema=ema))


def load_with_info(path: str | os.PathLike, ema: bool = False):
    """``(state_dict, ResolvedSource)``: the weights plus what the source says about the model."""
    src = resolve_source(path, ema=ema)
    return load_resolved(src), src
