"""Export trained weights for downstream codebases, each export verified by reloading it.

``python -m finetune.export --ckpt PATH --format timm [release] [release-d2] [--no-head] [--out DIR] [--ema]``

``PATH`` is anything :mod:`pretrain.weights` reads (a run directory, a DeepSpeed checkpoint or tag folder,
an fp32 / safetensors file, a release). ZeRO shards are consolidated to fp32 by DeepSpeed's own tool. Raw
weights by default, the EMA weights with ``--ema``. Default ``DIR``: ``RUN/exports/`` (``<source
folder>/exports`` for a file). Written into ``DIR``:

``model.safetensors`` + ``config.json`` (timm)
    ``config.json`` follows timm's hub layout (``architecture``, ``num_classes``, ``num_features``,
    ``model_args`` (e.g. ``img_size``), ``pretrained_cfg`` with input size / crop / mean / std,
    ``label_names``) plus ``label_space``. Load with (after ``import models``)::

        timm.create_model("local-dir:DIR", pretrained=True)
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))

    The second form needs ``num_classes=N`` (in the overlay and as an argument) and ``model_args`` when
    they differ from the registered defaults (timm drops a classifier whose class count differs from
    the pretrained cfg's).
``release.pth`` (release)
    The family's released checkpoint layout: exactly the release's ``state_dict()`` (its key names and
    order, tied copies, index buffers, float32) inside the container its own training script saves
    (ViL ``{'net': ..., 'arch': 'msvit'}``, the others ``{'model': ...}``), so it loads where the paper's
    classification, detection and segmentation code loads a released checkpoint. ``--no-head`` leaves
    the classifier out. The family's :class:`models.family.ReleaseLayout` says what and where from.
``release_d2.pth`` (release-d2; ViL and ResTv2, whose papers ship detectron2 code)
    What the release's own detectron2 converter writes from ``release.pth`` (ViL ``converter.py``:
    ``{'model': {'backbone.bottom_up.' + k: ...}}`` for the detection backbone ``--d2-arch`` at
    ``--d2-img-size``; ResTv2 ``convert_to_d2.py``: a flat ``{'backbone.bottom_up.' + k: ...}``), so
    that step can be skipped: pass the file as ``MODEL.WEIGHTS``.

The former ``mmdet`` / ``detectron2`` formats (our own key names under a prefix) are gone: no codebase
loaded them, the papers' detection and segmentation code expects the release layout above.

Verification (every format, before it is reported): timm -- reload through ``timm.create_model`` (both
forms above) and compare logits with the source model on a fixed input; release -- ``torch.load(...,
weights_only=True)``, the family's ``checkpoint_filter_fn`` into a fresh model, strict load, same logits
(same stage features with ``--no-head``); release-d2 -- strip the prefix and load through the family
filter strictly into the detection backbone's layout (ResTv2: into a fresh model, same logits).
``export_report.json`` records the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from data.labels import as_label_space
from pretrain.rundir import RunDir
from pretrain.surgery import adapt_state_dict
from pretrain.weights import ResolvedSource, load_with_info

FORMATS = ("timm", "release", "release-d2")
_REPLACED = {"mmdet": "release", "mmseg": "release", "detectron2": "release-d2"}
TIMM_WEIGHTS, TIMM_CONFIG = "model.safetensors", "config.json"
RELEASE_FILE, RELEASE_D2_FILE, REPORT_FILE = "release.pth", "release_d2.pth", "export_report.json"
_PCFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
              "first_conv", "classifier", "fixed_input_size", "license", "paper_ids")


class ExportError(RuntimeError):
    """An export that could not be built or did not verify."""


# ------------------------------------------------------------------------------------------ model

def _import_models() -> None:
    import models  # noqa: F401  (registers the families with timm)


def build_source_model(sd: Dict[str, torch.Tensor], src: ResolvedSource, model_name: Optional[str] = None,
                       model_kwargs: Optional[dict] = None) -> tuple[nn.Module, str, dict]:
    """The model the weights belong to, loaded strictly (``(model, name, model_args)``)."""
    import timm
    _import_models()
    name = model_name or src.model_name
    if not name:
        raise ExportError(f"{src.path}: the source does not name its model (no run config.yaml / config.json); "
                          "pass --model NAME")
    kwargs = dict(src.model_kwargs)
    kwargs.update(model_kwargs or {})
    if kwargs.get("num_classes") is None:
        clf = getattr(timm.models.get_pretrained_cfg(name), "classifier", None) or "head"
        w = sd.get(f"{clf}.weight")
        kwargs["num_classes"] = int(w.shape[0]) if w is not None else 0
    input_img_size = None
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:  # families without position tables take any size and no img_size argument
        if "img_size" not in str(e) or "img_size" not in kwargs:
            raise
        input_img_size = kwargs.pop("img_size")
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(adapt_state_dict(sd, model, head="keep"), strict=True)
    model.eval()
    model.hvp_input_img_size = input_img_size  # the run's input size when the constructor does not take it
    model_args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    return model, name, model_args


def _family(model: nn.Module):
    """The model's family (filter) and released layout from the one registry, :mod:`models.family`."""
    from models.family import family_of, release_layout_of
    fam, layout = family_of(model), release_layout_of(model)
    if fam is None or layout is None:
        raise ExportError(f"{type(model).__name__} is not a registered family; no released layout to export into")
    return fam, layout


def _input_size(model: nn.Module, model_args: dict) -> tuple:
    size = model_args.get("img_size") or getattr(model, "hvp_input_img_size", None)
    if size is None:
        return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (3, *size)


def _fixed_input(input_size: Sequence[int], batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=g)


def _stage_features(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return list(model.forward_intermediates(x, intermediates_only=True))


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise ExportError(f"{len(a)} outputs against {len(b)}")
    d = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ExportError(f"output shape {tuple(x.shape)} against {tuple(y.shape)}")
        d = max(d, (x.float() - y.float()).abs().max().item())
    return d


def _label_info(label_space: Any) -> tuple[Optional[str], Optional[List[str]]]:
    if label_space is None:
        return None, None
    try:
        ls = as_label_space(label_space)
    except Exception:  # noqa: BLE001 - metadata only
        return None, None
    return ls.name, list(ls.synsets)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------ writers

def write_timm(model: nn.Module, name: str, model_args: dict, out: Path, label_space: Any = None,
               meta: Optional[dict] = None, data_cfg: Optional[dict] = None) -> Dict[str, Path]:
    """``data_cfg``: the run's eval preprocessing (crop_pct, crop_mode, interpolation) over the defaults."""
    from safetensors.torch import save_file
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / TIMM_WEIGHTS), metadata={"format": "pt"})
    pcfg = {k: model.pretrained_cfg[k] for k in _PCFG_KEYS if model.pretrained_cfg.get(k) is not None}
    pcfg.update(data_cfg or {})
    pcfg["input_size"] = list(_input_size(model, model_args))
    pcfg["num_classes"] = model.num_classes
    ls_name, synsets = _label_info(label_space)
    cfg = {
        "architecture": name,
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "global_pool": getattr(model, "global_pool", None) if isinstance(getattr(model, "global_pool", None), str) else None,
        "model_args": model_args,
        "pretrained_cfg": _jsonable(pcfg),
        "label_space": ls_name,
        **({"label_names": synsets} if synsets and len(synsets) == model.num_classes else {}),
        "hvp_export": _jsonable(meta or {}),
    }
    (out / TIMM_CONFIG).write_text(json.dumps(cfg, indent=2))
    return {"weights": out / TIMM_WEIGHTS, "config": out / TIMM_CONFIG}


def release_state_dict(model: nn.Module, include_head: bool = True) -> Dict[str, torch.Tensor]:
    """``model``'s weights in its family's released ``state_dict()`` layout (tied entries stay one tensor,
    as in the release's own ``state_dict()``)."""
    _, layout = _family(model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return layout.state_dict_fn(sd, model, include_head=include_head)


def release_checkpoint(model: nn.Module, include_head: bool = True) -> Dict[str, Any]:
    """What the release's training script saves: ``{container: state_dict, **extra}``."""
    _, layout = _family(model)
    return {layout.container: release_state_dict(model, include_head), **dict(layout.container_extra)}


def write_release(model: nn.Module, out: Path, include_head: bool = True) -> Path:
    torch.save(release_checkpoint(model, include_head), out / RELEASE_FILE)
    return out / RELEASE_FILE


def release_d2_checkpoint(model: nn.Module, include_head: bool = True, **d2_kwargs) -> Any:
    """What the release's detectron2 converter writes from :func:`release_checkpoint` (ViL: ``arch=``,
    ``img_size=`` of the detection config)."""
    _, layout = _family(model)
    if layout.d2_fn is None:
        raise ExportError(f"{type(model).__name__}: its paper ships no detectron2 code; --format release-d2 is for "
                          "ViL and ResTv2 (use --format release)")
    if d2_kwargs and layout.d2_target_fn is None:
        raise ExportError(f"{type(model).__name__}: its detectron2 converter only adds a prefix; --d2-arch / "
                          "--d2-img-size describe ViL's detection config")
    return layout.d2_fn(release_state_dict(model, include_head), model, **d2_kwargs)


def write_release_d2(model: nn.Module, out: Path, include_head: bool = True, **d2_kwargs) -> Path:
    torch.save(release_d2_checkpoint(model, include_head, **d2_kwargs), out / RELEASE_D2_FILE)
    return out / RELEASE_D2_FILE


# ------------------------------------------------------------------------------------------ verifiers

def verify_timm(out: Path, name: str, model_args: dict, num_classes: int, x: torch.Tensor,
                ref_logits: torch.Tensor, atol: float = 1e-5) -> Dict[str, float]:
    import timm
    res = {}
    m1 = timm.create_model(name, pretrained=True, num_classes=num_classes, **model_args,
                           pretrained_cfg_overlay=dict(file=str(out / TIMM_WEIGHTS), num_classes=num_classes))
    m2 = timm.create_model(f"local-dir:{out}", pretrained=True)
    for key, m in (("overlay_file", m1), ("local_dir", m2)):
        m.eval()
        with torch.no_grad():
            logits = m(x)
        if logits.shape != ref_logits.shape:
            raise ExportError(f"timm reload ({key}) gives logits {tuple(logits.shape)}, source {tuple(ref_logits.shape)}")
        d = (logits - ref_logits).abs().max().item()
        if not d <= atol:
            raise ExportError(f"timm reload ({key}): logits differ from the source model by {d:.3g}")
        res[key] = d
    return res


def _reload_compare(sd: Any, model: nn.Module, name: str, model_args: dict, include_head: bool, x: torch.Tensor,
                    atol: float) -> float:
    """Load ``sd`` through the family filter strictly into a fresh model; max difference of its logits
    (features without the head) from ``model``'s."""
    import timm
    fam, _ = _family(model)
    fresh = timm.create_model(name, pretrained=False, num_classes=model.num_classes if include_head else 0,
                              **model_args).eval()
    fresh.load_state_dict(fam.filter_fn(sd, fresh), strict=True)
    with torch.no_grad():
        d = _max_diff([fresh(x)], [model(x)]) if include_head else \
            _max_diff(_stage_features(fresh, x), _stage_features(model, x))
    if not d <= atol:
        raise ExportError(f"reloading the release-layout weights gives outputs {d:.3g} away from the source model")
    return d


def verify_release(path: Path, model: nn.Module, name: str, model_args: dict, include_head: bool,
                   x: torch.Tensor, atol: float = 1e-5) -> Dict[str, Any]:
    _, layout = _family(model)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    sd = payload.get(layout.container) if isinstance(payload, dict) else None
    if not isinstance(sd, dict):
        raise ExportError(f"{path.name}: no {layout.container!r} entry (the release's container)")
    bad = sorted({str(v.dtype) for v in sd.values() if v.dtype not in (torch.float32, torch.int64)})
    if bad:
        raise ExportError(f"{path.name}: dtypes {bad}; the releases save float32 weights and int64 buffers")
    clf = (model.pretrained_cfg.get("classifier") or "head") + "."
    has_head = any(k.startswith(clf) for k in sd)
    if has_head and not include_head or include_head and not has_head and model.num_classes:
        raise ExportError(f"{path.name}: the classifier is {'missing' if include_head else 'still there'}")
    return {"container": layout.container, "num_entries": len(sd),
            "max_abs_diff": _reload_compare(payload, model, name, model_args, include_head, x, atol)}


def verify_release_d2(path: Path, model: nn.Module, name: str, model_args: dict, include_head: bool,
                      x: torch.Tensor, atol: float = 1e-5, **d2_kwargs) -> Dict[str, Any]:
    """The converter's output, prefix stripped, loads strictly through the family filter: into the
    detection backbone's layout (ViL, whose detection backbone differs from the classifier) or into a
    fresh model with the same outputs (ResTv2, whose converter only adds the prefix)."""
    fam, layout = _family(model)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    sd = payload["model"] if isinstance(payload.get("model"), dict) else payload
    prefix = "backbone.bottom_up."
    if not sd or not all(k.startswith(prefix) for k in sd):
        raise ExportError(f"{path.name}: not every key starts with {prefix!r}")
    stripped = {k[len(prefix):]: v for k, v in sd.items()}
    res: Dict[str, Any] = {"prefix": prefix, "container": "model" if "model" in payload else None,
                           "num_entries": len(sd)}
    if layout.d2_target_fn is not None:
        det = layout.d2_target_fn(model, **d2_kwargs)
        head = stripped.get("head.weight")
        det.reset_classifier(int(head.shape[0]) if head is not None else 0)
        det.load_state_dict(fam.filter_fn(stripped, det), strict=True, assign=True)
        res["loads_into_detection_backbone"] = True
    else:
        res["max_abs_diff"] = _reload_compare(stripped, model, name, model_args, include_head, x, atol)
    return res


# ------------------------------------------------------------------------------------------ API

def export(ckpt: str | os.PathLike, formats: Sequence[str] = ("timm",), out: Optional[str | os.PathLike] = None,
           ema: bool = False, model_name: Optional[str] = None, model_kwargs: Optional[dict] = None,
           label_space: Any = None, atol: float = 1e-5, include_head: bool = True,
           d2_kwargs: Optional[dict] = None) -> Dict[str, Any]:
    """Export ``ckpt`` into ``out`` in ``formats`` and verify each; returns the report (also written to
    ``out/export_report.json``). Raises :class:`ExportError` if a format does not verify.
    ``include_head=False`` (``--no-head``) leaves the classifier out of the release formats;
    ``d2_kwargs`` (ViL: ``arch``, ``img_size``) describe the detection config of ``release-d2``."""
    formats = list(dict.fromkeys(formats))
    replaced = [f for f in formats if f in _REPLACED]
    if replaced:
        raise ExportError(f"export format(s) {replaced} were replaced by the papers' own layouts: use "
                          + ", ".join(sorted({f"--format {_REPLACED[f]}" for f in replaced})))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    t0 = time.time()
    sd, src = load_with_info(ckpt, ema=ema)
    model, name, model_args = build_source_model(sd, src, model_name, model_kwargs)
    if out is None:
        base = RunDir(src.run_dir).exports_dir if src.run_dir else \
            (Path(src.path) if Path(src.path).is_dir() else Path(src.path).parent) / "exports"
        out = base
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = _fixed_input(_input_size(model, model_args))
    with torch.no_grad():
        ref_logits = model(x)
    meta = {"source": str(ckpt), "source_kind": src.kind, "source_file": src.file, "ema": ema}
    ls = label_space if label_space is not None else src.label_space
    report: Dict[str, Any] = {"model": name, "model_args": _jsonable(model_args), "num_classes": model.num_classes,
                              "out": str(out), **meta, "formats": {}}
    d2_kwargs = {k: v for k, v in (d2_kwargs or {}).items() if v is not None}
    for fmt in formats:
        if fmt == "timm":
            paths = write_timm(model, name, model_args, out, label_space=ls, meta=meta, data_cfg=src.data_cfg)
            diffs = verify_timm(out, name, model_args, model.num_classes, x, ref_logits, atol)
            report["formats"]["timm"] = {"files": [str(p) for p in paths.values()], "verified": True,
                                         "max_abs_logit_diff": diffs}
        elif fmt == "release":
            path = write_release(model, out, include_head)
            res = verify_release(path, model, name, model_args, include_head, x, atol)
            report["formats"]["release"] = {"files": [str(path)], "verified": True, "head": include_head,
                                            "layout_source": _family(model)[1].source, **res}
        else:
            path = write_release_d2(model, out, include_head, **d2_kwargs)
            res = verify_release_d2(path, model, name, model_args, include_head, x, atol, **d2_kwargs)
            report["formats"]["release-d2"] = {"files": [str(path)], "verified": True, "head": include_head,
                                               "converter": _family(model)[1].d2_source,
                                               "d2_args": _jsonable(d2_kwargs), **res}
    report["seconds"] = round(time.time() - t0, 2)
    (out / REPORT_FILE).write_text(json.dumps(_jsonable(report), indent=2))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run dir, DeepSpeed checkpoint/tag dir, .safetensors/.pt, release")
    p.add_argument("--format", nargs="+", default=["timm"], help=f"one or more of {', '.join(FORMATS)}")
    p.add_argument("--no-head", action="store_true", help="release formats: leave the classifier out")
    p.add_argument("--d2-arch", default=None,
                   help="release-d2, ViL: the detection config's MODEL.TRANSFORMER.MSVIT.ARCH (default: the "
                        "*_sparse configs' layout for this model: Vision Longformer f7 in every stage)")
    p.add_argument("--d2-img-size", type=int, default=None,
                   help="release-d2, ViL: the detection config's INPUT.MAX_SIZE_TRAIN (default 1333)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/exports/)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (ema.safetensors / model_ema)")
    p.add_argument("--model", default=None, help="model name when the source does not record it")
    p.add_argument("--img-size", type=int, default=None, help="model img_size when the source does not record it")
    p.add_argument("--label-space", default=None, help="label space name or synset file for config.json")
    args = p.parse_args(argv)
    kwargs = {"img_size": args.img_size} if args.img_size else None
    try:
        rep = export(args.ckpt, args.format, args.out, ema=args.ema, model_name=args.model, model_kwargs=kwargs,
                     label_space=args.label_space, include_head=not args.no_head,
                     d2_kwargs={"arch": args.d2_arch, "img_size": args.d2_img_size})
    except Exception as e:  # noqa: BLE001 - one clear line for the user, non-zero exit
        print(f"export failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for fmt, r in rep["formats"].items():
        print(f"{fmt}: {', '.join(r['files'])} (verified)")
    print(f"report: {Path(rep['out']) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
