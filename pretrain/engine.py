"""Components of a training run: model, DeepSpeed config, loss, evaluation, library quieting.

:class:`pretrain.trainer.Trainer` assembles them; ``python -m pretrain.evaluate`` reuses the model and
evaluation parts. Nothing here owns files: the run directory is :mod:`pretrain.rundir`'s.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.metrics import topk_correct
from pretrain.rundir import RunDir, tag_for

log = logging.getLogger("pretrain")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# Fault injection for the crash tests (documented in tests/test_engine_*.py): never set in real runs.
FAULT_NAN_STEPS = "HVP_FAULT_NAN_STEPS"        # comma-separated step attempts (1-based, this process) made NaN
FAULT_CRASH_IN_CKPT = "HVP_FAULT_CRASH_IN_CKPT"  # step whose checkpoint write dies before publishing


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------
# setup helpers

def quiet_libraries(rank: int) -> None:
    """Keep the useful warnings; drop the known-noisy ones (hundreds per step under ZeRO-3 on CPU)."""
    for msg in (".*all_gather_into_tensor.*", ".*reduce_scatter_tensor.*", ".*torch.cuda.amp.*",
                ".*TypedStorage is deprecated.*", ".*CUDA not available.*", ".*torch.load.*weights_only.*",
                ".*No device id is provided.*", ".*barrier.*device.*", ".*Importing from timm.models.*"):
        warnings.filterwarnings("ignore", message=msg)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "nvidia.dali"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def no_jit_comm_ops() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory comm op (50-85 s per machine,
    a C++ toolchain at run time); gloo does the collectives. ``HVP_DS_SHM_COMM=1`` opts back in.

    DeepSpeed consults ``deepspeed.ops.__compatible_ops__`` (a module-level dict it documents as editable)
    before building the op; an op missing from it counts as incompatible.
    """
    if torch.cuda.is_available() or os.environ.get("HVP_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def local_device() -> torch.device:
    """This process's device: its current CUDA device (set by ``launch.distributed``), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_model_name(name: str) -> None:
    import timm

    import models  # noqa: F401  (registers the families)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"config key 'model.name': unknown model {name!r}"
                          + (f" (registered: {', '.join(close)}, ...)" if close else ""))


def build_model(cfg: Config, num_classes: int):
    """The configured timm model; a constructor argument it refuses is a ConfigError naming the key."""
    import timm

    import models  # noqa: F401

    kwargs = dict(cfg.model.kwargs)
    if cfg.model.img_size is not None:
        kwargs["img_size"] = cfg.model.img_size
    try:
        model = timm.create_model(cfg.model.name, pretrained=False, num_classes=num_classes,
                                  drop_path_rate=cfg.model.drop_path, **kwargs)
    except (TypeError, ValueError) as e:
        # unknown or mistyped constructor arguments (the families refuse them) and impossible sizes
        raise ConfigError(f"config key 'model.kwargs' / 'model.img_size' for {cfg.model.name}: "
                          f"{str(e).splitlines()[0]}") from None
    _refuse_input_size(model, cfg.model.name, cfg.model.img_size or model.pretrained_cfg["input_size"][-1])
    if cfg.model.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def _refuse_input_size(model, name: str, size: int) -> None:
    """The families check their input geometry in forward (MSG-Transformer: enough first-stage windows for its
    shuffle), so one image goes through the fresh model here: a size it refuses becomes a config error before
    the run directory is written, not a traceback at the first step. Eval mode and no_grad: no state, no
    randomness is used."""
    from models.measure import forward_zeros

    try:
        forward_zeros(model, size)
    except ValueError as e:
        raise ConfigError(f"config key 'model.img_size'={size} for {name}: {str(e).splitlines()[0]}") from None


def model_data_cfg(cfg: Config) -> dict:
    """Input size, normalisation and eval crop for the configured model (its timm default cfg)."""
    import timm

    import models  # noqa: F401

    pc = timm.models.get_pretrained_cfg(cfg.model.name)
    pc = pc.to_dict() if pc is not None else {}
    return {"img_size": cfg.model.img_size or pc.get("input_size", (3, 224, 224))[-1],
            "mean": tuple(pc.get("mean", (0.485, 0.456, 0.406))), "std": tuple(pc.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": cfg.data.crop_pct or pc.get("crop_pct", 0.875)}


def classifier_module(model_name: str) -> str:
    """Dotted name of the model's classifier (its timm default cfg's ``classifier``: ``head``, ``head.3``, ...)."""
    import timm

    import models  # noqa: F401

    pc = timm.models.get_pretrained_cfg(model_name)
    return (pc.classifier if pc is not None and pc.classifier else "head")


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Our config -> DeepSpeed's (ZeRO stage, bf16, clipping, accumulation, offload)."""
    t, ds = cfg.train, cfg.deepspeed
    zero = {"stage": ds.zero_stage}
    zero_force_cpu = True
    if ds.offload in ("optimizer", "both"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # our client optimizer (torch AdamW / QHM) steps the offloaded fp32 master weights on the CPU
        zero_force_cpu = False
    if ds.offload in ("param", "both"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.clip_grad,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": zero_force_cpu,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16" and ds.zero_stage == 0:
        conf["bf16"]["immediate_grad_update"] = False
    return conf


def build_loss(cfg: Config, num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = cfg.aug
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                      switch_prob=a.mixup_switch_prob, label_smoothing=a.label_smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if a.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=a.label_smoothing)
    return None, torch.nn.CrossEntropyLoss()


def fault_nan_steps() -> set[int]:
    return {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}


def fault_crash_hook():
    step = os.environ.get(FAULT_CRASH_IN_CKPT)
    if not step:
        return None

    def hook(tag):
        if tag == tag_for(int(step)):
            os._exit(17)
    return hook


# ---------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(module, loader, device, dtype, class_index: torch.Tensor | None = None) -> dict:
    """Top-1/top-5 over the eval loader; every sample counted once (labels -1 are padding)."""
    was_training = module.training
    module.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for images, labels in loader:
        logits = module(images.to(device=device, dtype=dtype)).float()
        if class_index is not None:
            logits = logits.index_select(1, class_index.to(logits.device))
        c1, c5 = topk_correct(logits, labels.to(logits.device))
        counts += torch.tensor([c1, c5, int((labels >= 0).sum())], dtype=torch.float64)
    dist.all_reduce(counts)
    module.train(was_training)
    n = max(counts[2].item(), 1.0)
    return {"eval/top1": 100.0 * counts[0].item() / n, "eval/top5": 100.0 * counts[1].item() / n,
            "eval/samples": int(counts[2].item())}


def eval_class_index(cfg: Config, train_label_space, eval_label_space) -> torch.Tensor | None:
    """Columns of a 21K model's logits that are the 1K eval classes (eval.label_map=21k-to-1k)."""
    if cfg.eval.label_map != "21k-to-1k":
        return None
    from data.labels import as_label_space, map_21k_to_1k

    if train_label_space is None or eval_label_space is None:
        raise ConfigError("eval.label_map=21k-to-1k needs the label spaces of the model and of the eval data")
    return torch.tensor(map_21k_to_1k(as_label_space(train_label_space), as_label_space(eval_label_space)),
                        dtype=torch.long)


def config_from_checkpoint(path: Path) -> Config:
    """The resolved config a run directory was trained with."""
    run = RunDir(path)
    if run.config_file.is_file():
        return config_from_dict(run.read_config())
    raise FileNotFoundError(f"no {run.config_file.name} in {path}")
