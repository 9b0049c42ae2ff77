"""Typed run configuration: YAML recipes + ``section.key=value`` overrides, validated before anything starts.

A recipe is a YAML mapping of sections (``run``, ``model``, ``data``, ...) plus two top-level globals
(``seed``, ``precision``). ``base: other.yaml`` inherits another recipe (path relative to the file).
Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` with one message that
names the key. The resolved config is what the run directory records (``config.yaml``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the offending key."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    resume: str = "auto"  # auto | never | PATH (a checkpoint directory or tag directory)
    provenance: bool = True  # write command line, git SHA and pip freeze into the run dir


@dataclass
class ModelConfig:
    name: str = "vil_tiny_rpb_224"
    img_size: int | None = None  # default: the model's default cfg
    num_classes: int | None = None  # default: the training data's label space
    drop_path: float = 0.1
    grad_ckpt: bool = False
    kwargs: dict = field(default_factory=dict)  # extra model constructor arguments


@dataclass
class DataConfig:
    train: str = ""  # brace pattern of shards, a directory with manifest.json, or a manifest path
    eval: str = ""
    pipeline: str = "dali"  # dali | torch
    workers: int = 2
    crop_pct: float | None = None  # default: the model's default cfg
    eval_crop: str = "center"  # center | squash
    train_crop: str = "rrc"  # rrc (random-resized-crop) | resize_crop (finetune: resize, random crop)
    interpolation: str = "bicubic"
    verify_samples: str = "markers"  # markers (JPEG/PNG markers, once per shard) | decode (full decode) | none
    allow_missing_shards: bool = False  # an unreadable shard is skipped (counted, logged on every rank), not an error


@dataclass
class AugConfig:
    randaug: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; '' disables
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    reprob: float = 0.25
    hflip: float = 0.5


@dataclass
class TrainConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 0.0
    micro_batch: int = 64  # per rank, per forward
    grad_accum: int = 1
    global_batch: int = 0  # 0 = micro_batch * grad_accum * world_size; else must equal that
    clip_grad: float = 5.0  # 0 disables
    ema: float = 0.0  # EMA decay of weights; 0 disables
    max_nonfinite: int = 5  # consecutive non-finite losses before stopping
    stop_at_step: int = 0  # checkpoint and exit 0 after this step (time-sliced jobs); 0 = off
    compile: bool = False  # torch.compile the model inside the DeepSpeed engine (training and evaluation)
    # torch.compile backend: inductor generates fused kernels; aot_eager traces forward and backward the same
    # way (AOTAutograd) but runs eager kernels, to check a model's graphs without minutes of code generation
    compile_backend: str = "inductor"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | qhm
    lr: float = 1e-3
    lr_scaling_base: int = 0  # 0: lr is absolute; 256|512: lr * global_batch / base (the papers')
    weight_decay: float = 0.05
    layer_decay: float = 0.0  # 0 disables layer-wise lr decay
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # qhm
    nu: float = 1.0  # qhm


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload: str = "none"  # none | optimizer | param | both (compiles DeepSpeed ops at runtime)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    every_minutes: float = 30.0
    keep: int = 3


@dataclass
class LogConfig:
    every_steps: int = 10
    image_grid: bool = True  # a grid of the first augmented batch in TensorBoard


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only by epoch / at the end
    every_epoch: bool = True
    label_map: str = ""  # '' | 21k-to-1k


@dataclass
class FinetuneConfig:
    init: str = ""  # checkpoint to start from (ZeRO dir, run dir, fp32/safetensors file, release)
    head: str = "keep"  # keep | reinit | map21k
    bias_interp: str = "bilinear"  # bilinear (ViL release) | bicubic (Swin)


@dataclass
class LaunchConfig:
    backend: str = "auto"  # auto (nccl with CUDA, gloo otherwise) | nccl | gloo
    timeout_minutes: float = 30.0


@dataclass
class Config:
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the hardware has it natively, else fp32) | bf16 | fp32
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "precision": ("auto", "bf16", "fp32"),
    "data.pipeline": ("dali", "torch"),
    "data.eval_crop": ("center", "squash"),
    "data.train_crop": ("rrc", "resize_crop"),
    "data.interpolation": ("bicubic", "bilinear"),
    "data.verify_samples": ("markers", "decode", "none"),
    "optim.name": ("adamw", "qhm"),
    "optim.lr_scaling_base": (0, 256, 512),
    "sched.name": ("cosine",),
    "train.compile_backend": ("inductor", "aot_eager", "eager", "cudagraphs"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "deepspeed.offload": ("none", "optimizer", "param", "both"),
    "eval.label_map": ("", "21k-to-1k"),
    "finetune.head": ("keep", "reinit", "map21k"),
    "finetune.bias_interp": ("bilinear", "bicubic"),
    "launch.backend": ("auto", "nccl", "gloo"),
}


# ---------------------------------------------------------------------------------------------------
# typed merge of plain data into the dataclasses

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _fail(key, value, tp)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    return _fail(key, value, tp)


def _fail(key, value, tp):
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key '{key}': expected {name}, got {value!r}")


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _read_recipe(path: Path, seen: tuple = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"recipe inheritance loops through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_recipe(path.parent / base, seen + (path.resolve(),))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=1e-3'`` -> (['optim', 'lr'], 0.001). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple = (),
                aliases: dict[str, str] | None = None) -> Config:
    """Defaults <- recipe (with ``base`` inheritance) <- overrides, then :func:`validate`."""
    data = _read_recipe(Path(recipe)) if recipe else {}
    for text in overrides:
        path, value = parse_override(text)
        if aliases and ".".join(path) in aliases:
            path = aliases[".".join(path)].split(".")
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from its ``to_dict()`` (e.g. the copy saved in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Refuse impossible settings before anything starts; one message naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
    t = cfg.train
    if t.max_steps < 0:
        raise ConfigError("config key 'train.max_steps' must be >= 0")
    if t.max_steps == 0 and t.epochs <= 0:
        raise ConfigError("set 'train.max_steps' or 'train.epochs' (both are 0: the run would not train)")
    for key in ("train.micro_batch", "train.grad_accum", "log.every_steps", "checkpoint.keep"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {_get(cfg, key)}")
    if t.global_batch < 0 or (t.global_batch and t.global_batch % (t.micro_batch * t.grad_accum)):
        raise ConfigError(f"config key 'train.global_batch'={t.global_batch} is not a multiple of "
                          f"micro_batch*grad_accum={t.micro_batch * t.grad_accum}")
    if t.clip_grad < 0:
        raise ConfigError("config key 'train.clip_grad' must be >= 0 (0 disables)")
    if not 0.0 <= t.ema < 1.0:
        raise ConfigError(f"config key 'train.ema' must be in [0, 1), got {t.ema}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"config key 'optim.layer_decay' must be in [0, 1], got {cfg.optim.layer_decay}")
    if cfg.sched.warmup_steps is not None and cfg.sched.warmup_epochs is not None:
        raise ConfigError("set only one of 'sched.warmup_steps' and 'sched.warmup_epochs'")
    if cfg.sched.min_lr > cfg.optim.lr:
        raise ConfigError(f"config key 'sched.min_lr'={cfg.sched.min_lr} exceeds 'optim.lr'={cfg.optim.lr}")
    ds = cfg.deepspeed
    if ds.offload in ("optimizer", "both") and ds.zero_stage == 0:
        raise ConfigError("config key 'deepspeed.offload'=optimizer needs deepspeed.zero_stage >= 1")
    if ds.offload in ("param", "both") and ds.zero_stage != 3:
        raise ConfigError("config key 'deepspeed.offload'=param needs deepspeed.zero_stage=3")
    if cfg.model.drop_path < 0 or cfg.model.drop_path >= 1:
        raise ConfigError(f"config key 'model.drop_path' must be in [0, 1), got {cfg.model.drop_path}")
    if cfg.model.img_size is not None and cfg.model.img_size % 32:
        raise ConfigError(f"config key 'model.img_size'={cfg.model.img_size} must be a multiple of 32 "
                          "(the backbones' total stride)")
    if cfg.data.crop_pct is not None and not 0 < cfg.data.crop_pct <= 1:
        raise ConfigError(f"config key 'data.crop_pct' must be in (0, 1], got {cfg.data.crop_pct}")
    if cfg.data.workers < 0:
        raise ConfigError("config key 'data.workers' must be >= 0")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.every_minutes < 0:
        raise ConfigError("config keys 'checkpoint.every_steps'/'every_minutes' must be >= 0 (0 disables)")
    if cfg.finetune.head == "map21k" and not cfg.finetune.init:
        raise ConfigError("config key 'finetune.head'=map21k needs 'finetune.init' (a 21K checkpoint)")
    if cfg.train.compile and cfg.model.kwargs.get("vil_mode"):
        raise ConfigError("config key 'train.compile'=true with model.kwargs.vil_mode>0 (random-shift attention "
                          "draws its shift per step inside the graph, which torch.compile cannot trace); use one")
    if not cfg.run.dir:
        raise ConfigError("config key 'run.dir' must not be empty")


def _get(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_grad_accum(t, world: int) -> int:
    """``grad_accum`` for this world size: derived from ``train.global_batch`` when a recipe fixes the global
    batch (its lr is tuned for it), else the configured one. Refuses a layout that cannot give that batch."""
    if not t.global_batch:
        return t.grad_accum
    per_step = t.micro_batch * world
    if t.global_batch % per_step == 0 and t.grad_accum in (1, t.global_batch // per_step):
        return t.global_batch // per_step
    if t.global_batch % per_step == 0:
        raise ConfigError(f"config key 'train.grad_accum'={t.grad_accum} contradicts 'train.global_batch'="
                          f"{t.global_batch} on {world} processes (it would be {t.global_batch // per_step}); "
                          "leave grad_accum at 1 to derive it")
    per_rank = t.global_batch // t.micro_batch if t.global_batch % t.micro_batch == 0 else 0
    worlds = [w for w in range(1, per_rank + 1) if per_rank % w == 0]
    micros = [m for m in range(1, t.global_batch // world + 1) if t.global_batch % (m * world) == 0]
    fix = " or ".join(([f"use a world size in {worlds[-8:]}"] if worlds else [])
                      + ([f"train.micro_batch= one of {micros[-6:]}"] if micros else [])) or "no layout fits"
    raise ConfigError(f"config key 'train.global_batch'={t.global_batch} cannot be reached with micro_batch "
                      f"{t.micro_batch} on {world} processes: {fix} (the recipe's lr is tuned for this batch)")
