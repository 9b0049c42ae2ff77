"""Export trained weights for downstream codebases, each export verified by reloading it.

``python -m finetune.export --ckpt PATH --format timm [mmdet] [detectron2] [--out DIR] [--ema]``

``PATH`` is anything :mod:`finetune.sources` reads (a run directory, a DeepSpeed checkpoint or tag
folder, an fp32 / safetensors file, a release). ZeRO shards are consolidated to fp32 by DeepSpeed's own
tool. Raw weights by default, the EMA weights with ``--ema``. Default ``DIR``: ``RUN/exports/``
(``<source folder>/exports`` for a file). Written into ``DIR``:

``model.safetensors`` + ``config.json`` (timm)
    ``config.json`` follows timm's hub layout (``architecture``, ``num_classes``, ``num_features``,
    ``model_args`` (e.g. ``img_size``), ``pretrained_cfg`` with input size / crop / mean / std,
    ``label_names``) plus ``label_space``. Load with (after ``import models``)::

        timm.create_model("local-dir:DIR", pretrained=True)
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))

    The second form needs ``num_classes=N`` (in the overlay and as an argument) and ``model_args`` when
    they differ from the registered defaults (timm drops a classifier whose class count differs from
    the pretrained cfg's).
``mmdet_backbone.pth`` (mmdet / mmseg)
    ``{'state_dict': {'backbone.' + k: tensor}, 'meta': {...}}``, classifier dropped; loads with
    ``torch.load(weights_only=True)`` and mmengine's ``load_checkpoint``.
``detectron2_backbone.pkl`` (detectron2)
    ``{'model': {'backbone.bottom_up.' + k: numpy}, '__author__': ..., 'matching_heuristics': True}``.

Verification (every format, before it is reported): timm -- reload through ``timm.create_model`` (both
forms above) and compare logits with the source model on a fixed input; mmdet and detectron2 -- strip the
prefix, load strictly into a head-less model (``num_classes=0``) and compare every stage's feature map
(``forward_intermediates``); additionally the export is loaded through timm's ``features_only`` path and
its maps compared when that model has no parameters of its own (ResTv2's detection ``out_norms`` are
fresh, so there only the shapes are checked). ``export_report.json`` records the result.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .sources import ResolvedSource, load_with_info
from .surgery import adapt_state_dict, as_label_space, classifier_name

FORMATS = ("timm", "mmdet", "mmseg", "detectron2")
TIMM_WEIGHTS, TIMM_CONFIG = "model.safetensors", "config.json"
MMDET_FILE, D2_FILE, REPORT_FILE = "mmdet_backbone.pth", "detectron2_backbone.pkl", "export_report.json"
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
        raise ExportError(f"{len(a)} feature maps against {len(b)}")
    d = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ExportError(f"feature map shape {tuple(x.shape)} against {tuple(y.shape)}")
        d = max(d, (x.float() - y.float()).abs().max().item())
    return d


def _backbone_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Weights without the classifier (what detection/segmentation codebases take)."""
    clf = classifier_name(model)
    sd = model.state_dict()
    if clf:
        sd = {k: v for k, v in sd.items() if not k.startswith(clf + ".")}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _label_info(label_space: Any) -> tuple[Optional[str], Optional[List[str]]]:
    if label_space is None:
        return None, None
    try:
        ls = as_label_space(label_space)
    except Exception:  # noqa: BLE001 - metadata only
        return None, None
    return ls.name, list(ls.synsets)


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


def write_mmdet(model: nn.Module, name: str, model_args: dict, out: Path, meta: Optional[dict] = None) -> Path:
    bb = _backbone_state_dict(model)
    info = [dict(num_chs=f["num_chs"], reduction=f["reduction"]) for f in getattr(model, "feature_info", [])]
    payload = {"state_dict": {"backbone." + k: v for k, v in bb.items()},
               "meta": _jsonable({"timm_model": name, "model_args": model_args, "out_indices": list(range(len(info))),
                                  "feature_info": info, "input_size": list(_input_size(model, model_args)),
                                  "mean": model.pretrained_cfg.get("mean"), "std": model.pretrained_cfg.get("std"),
                                  "head_dropped": True, **(meta or {})})}
    torch.save(payload, out / MMDET_FILE)
    return out / MMDET_FILE


def write_detectron2(model: nn.Module, name: str, out: Path) -> Path:
    bb = _backbone_state_dict(model)
    payload = {"model": {"backbone.bottom_up." + k: v.numpy() for k, v in bb.items()},
               "__author__": f"hvp finetune.export ({name})", "matching_heuristics": True}
    with open(out / D2_FILE, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    return out / D2_FILE


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


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


def _headless(name: str, model_args: dict) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, num_classes=0, **model_args).eval()


def verify_backbone(sd: Dict[str, torch.Tensor], prefix: str, name: str, model_args: dict, x: torch.Tensor,
                    ref_feats: List[torch.Tensor], atol: float = 1e-5) -> Dict[str, Any]:
    """Strip ``prefix``, load strictly into a head-less model and compare stage features."""
    import timm
    if not all(k.startswith(prefix) for k in sd):
        raise ExportError(f"not every key starts with {prefix!r}")
    stripped = {k[len(prefix):]: torch.as_tensor(v) for k, v in sd.items()}
    m = _headless(name, model_args)
    m.load_state_dict(stripped, strict=True)
    d = _max_diff(_stage_features(m, x), ref_feats)
    if not d <= atol:
        raise ExportError(f"stage features after reloading ({prefix}) differ from the source by {d:.3g}")
    res: Dict[str, Any] = {"max_abs_diff": d}
    # the features_only path downstream users take (through the family filter)
    fo = timm.create_model(name, features_only=True, pretrained=True, **model_args,
                           pretrained_cfg_overlay=dict(state_dict=dict(stripped))).eval()
    with torch.no_grad():
        fo_feats = list(fo(x))
    own = set(fo.model.state_dict()) - set(stripped) if hasattr(fo, "model") else set()
    own = {k for k in own if not k.endswith("num_batches_tracked")}
    if own:
        if [f.shape for f in fo_feats] != [f.shape for f in ref_feats[:len(fo_feats)]]:
            raise ExportError("features_only model returns maps of other shapes than the source")
        res["features_only"] = f"loaded; shapes checked ({len(own)} fresh tensors of its own, e.g. {sorted(own)[0]})"
    else:
        d2 = _max_diff(fo_feats, ref_feats[:len(fo_feats)])
        if not d2 <= atol:
            raise ExportError(f"features_only model differs from the source by {d2:.3g}")
        res["features_only"] = d2
    return res


# ------------------------------------------------------------------------------------------ API

def export(ckpt: str | os.PathLike, formats: Sequence[str] = ("timm",), out: Optional[str | os.PathLike] = None,
           ema: bool = False, model_name: Optional[str] = None, model_kwargs: Optional[dict] = None,
           label_space: Any = None, atol: float = 1e-5) -> Dict[str, Any]:
    """Export ``ckpt`` into ``out`` in ``formats`` and verify each; returns the report (also written to
    ``out/export_report.json``). Raises :class:`ExportError` if a format does not verify."""
    formats = list(dict.fromkeys("mmdet" if f == "mmseg" else f for f in formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format(s) {bad}; choose from timm, mmdet (= mmseg), detectron2")
    t0 = time.time()
    sd, src = load_with_info(ckpt, ema=ema)
    model, name, model_args = build_source_model(sd, src, model_name, model_kwargs)
    if out is None:
        base = Path(src.run_dir) if src.run_dir else (Path(src.path) if Path(src.path).is_dir() else Path(src.path).parent)
        out = base / "exports"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = _fixed_input(_input_size(model, model_args))
    with torch.no_grad():
        ref_logits = model(x)
    ref_feats = _stage_features(model, x)
    meta = {"source": str(ckpt), "source_kind": src.kind, "source_file": src.file, "ema": ema}
    ls = label_space if label_space is not None else src.label_space
    report: Dict[str, Any] = {"model": name, "model_args": _jsonable(model_args), "num_classes": model.num_classes,
                              "out": str(out), **meta, "formats": {}}
    for fmt in formats:
        if fmt == "timm":
            paths = write_timm(model, name, model_args, out, label_space=ls, meta=meta, data_cfg=src.data_cfg)
            diffs = verify_timm(out, name, model_args, model.num_classes, x, ref_logits, atol)
            report["formats"]["timm"] = {"files": [str(p) for p in paths.values()], "verified": True,
                                         "max_abs_logit_diff": diffs}
        elif fmt == "mmdet":
            path = write_mmdet(model, name, model_args, out, meta=meta)
            payload = torch.load(path, map_location="cpu", weights_only=True)
            res = verify_backbone(payload["state_dict"], "backbone.", name, model_args, x, ref_feats, atol)
            report["formats"]["mmdet"] = {"files": [str(path)], "verified": True, **res}
        else:
            path = write_detectron2(model, name, out)
            with open(path, "rb") as f:
                payload = pickle.load(f)  # our own file, written just above
            if payload.get("matching_heuristics") is not True:
                raise ExportError("detectron2 export lost matching_heuristics")
            res = verify_backbone(payload["model"], "backbone.bottom_up.", name, model_args, x, ref_feats, atol)
            report["formats"]["detectron2"] = {"files": [str(path)], "verified": True, **res}
    report["seconds"] = round(time.time() - t0, 2)
    (out / REPORT_FILE).write_text(json.dumps(_jsonable(report), indent=2))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run dir, DeepSpeed checkpoint/tag dir, .safetensors/.pt, release")
    p.add_argument("--format", nargs="+", default=["timm"], choices=FORMATS, help="one or more formats")
    p.add_argument("--out", default=None, help="output folder (default: RUN/exports/)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (ema.safetensors / model_ema)")
    p.add_argument("--model", default=None, help="model name when the source does not record it")
    p.add_argument("--img-size", type=int, default=None, help="model img_size when the source does not record it")
    p.add_argument("--label-space", default=None, help="label space name or synset file for config.json")
    args = p.parse_args(argv)
    kwargs = {"img_size": args.img_size} if args.img_size else None
    try:
        rep = export(args.ckpt, args.format, args.out, ema=args.ema, model_name=args.model, model_kwargs=kwargs,
                     label_space=args.label_space)
    except Exception as e:  # noqa: BLE001 - one clear line for the user, non-zero exit
        print(f"export failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for fmt, r in rep["formats"].items():
        print(f"{fmt}: {', '.join(r['files'])} (verified)")
    print(f"report: {Path(rep['out']) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
