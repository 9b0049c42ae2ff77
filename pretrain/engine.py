"""The training engine: timm model -> DeepSpeed (ZeRO / bf16) -> train/eval loop with exact resume.

``train(cfg)`` is the one entry point (``python -m pretrain``, ``python -m finetune``, submitit jobs).
Per optimizer step every rank all-reduces one small tensor [loss, non-finite, stop-request,
time-to-checkpoint], so all ranks take the same decisions (skip, checkpoint, stop) at the same step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from launch.distributed import init_distributed
from pretrain import checkpoint as ckpt
from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.metrics import RunLogger, StepTimer, peak_flops, topk_correct
from pretrain.optim import build_optimizer, build_scheduler, effective_lr
from pretrain.signals import EXIT_REQUEUE, STOP, request_stop  # noqa: F401  (request_stop re-exported)

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

def _quiet_libraries(rank: int) -> None:
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


def _no_jit_comm_ops() -> None:
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


def _model_name_check(name: str) -> None:
    import timm

    import models  # noqa: F401  (registers the families)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"config key 'model.name': unknown model {name!r}"
                          + (f" (registered: {', '.join(close)}, ...)" if close else ""))


def _write_provenance(cfg: Config, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if not cfg.run.provenance:
        return
    (run_dir / "command.txt").write_text(" ".join([sys.executable] + sys.argv) + "\n")
    repo = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
    (run_dir / "git_sha.txt").write_text((sha.stdout.strip() or "unknown")
                                         + (" (dirty)" if dirty.stdout.strip() else "") + "\n")
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True)
    (run_dir / "pip_freeze.txt").write_text(freeze.stdout)


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path, rank: int):
    """One live job per run directory: rank 0 holds an exclusive flock for the run's lifetime.

    Collective: every rank learns whether rank 0 got the lock, so a refused job stops on all ranks
    instead of leaving the others waiting in a collective.
    """
    fd, holder = None, ""
    if rank == 0:
        fd = os.open(run_dir / ".train.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={os.uname().nodename} "
                          f"job={os.environ.get('SLURM_JOB_ID', '-')}\n".encode(), 0)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            fd = None
    refused = torch.tensor([0.0 if rank != 0 or fd is not None else 1.0])
    dist.all_reduce(refused)
    if refused.item():
        raise TrainingError(f"run directory {run_dir} is in use by another live job"
                            f"{f' ({holder})' if holder else ''}; use another run.dir or stop that job")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def build_model(cfg: Config, num_classes: int):
    import timm

    import models  # noqa: F401

    kwargs = dict(cfg.model.kwargs)
    if cfg.model.img_size is not None:
        kwargs["img_size"] = cfg.model.img_size
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=num_classes,
                              drop_path_rate=cfg.model.drop_path, **kwargs)
    if cfg.model.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def model_data_cfg(cfg: Config) -> dict:
    """Input size, normalisation and eval crop for the configured model (its timm default cfg)."""
    import timm

    import models  # noqa: F401

    pc = timm.models.get_pretrained_cfg(cfg.model.name)
    pc = pc.to_dict() if pc is not None else {}
    return {"img_size": cfg.model.img_size or pc.get("input_size", (3, 224, 224))[-1],
            "mean": tuple(pc.get("mean", (0.485, 0.456, 0.406))), "std": tuple(pc.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": cfg.data.crop_pct or pc.get("crop_pct", 0.875)}


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


def _loss_fn(cfg: Config, num_classes: int):
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


def _fault_steps() -> set[int]:
    return {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}


def _crash_hook():
    step = os.environ.get(FAULT_CRASH_IN_CKPT)
    if not step:
        return None

    def hook(tag):
        if tag == ckpt.tag_for(int(step)):
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
    from data.labels import map_21k_to_1k

    if train_label_space is None or eval_label_space is None:
        raise ConfigError("eval.label_map=21k-to-1k needs the label spaces of the model and of the eval data")
    return torch.tensor(map_21k_to_1k(as_label_space(train_label_space), as_label_space(eval_label_space)),
                        dtype=torch.long)


def as_label_space(space):
    """A loader's label-space record ({name, synsets}) or a name -> data.labels.LabelSpace."""
    from data.labels import LabelSpace, load_label_space

    if isinstance(space, LabelSpace):
        return space
    if isinstance(space, str):
        return load_label_space(space)
    if space.get("synsets"):
        return LabelSpace(space.get("name", "custom"), list(space["synsets"]))
    return load_label_space(space["name"])


# ---------------------------------------------------------------------------------------------------
# the loop

def train(cfg: Config) -> int:
    """Run (or resume) training as configured; returns the process exit code."""
    env = init_distributed(cfg.launch.backend, cfg.launch.timeout_minutes)
    rank, world = env.rank, env.world_size
    _quiet_libraries(rank)
    STOP.install()
    code = EXIT_FAILED
    try:
        code = _train(cfg, rank, world)
        return code
    except (ConfigError, TrainingError, ckpt.CheckpointError) as e:
        log.error("%s", e)
        code = EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_FAILED
        return code
    finally:
        STOP.restore()
        if dist.is_initialized():
            if code in (EXIT_OK, EXIT_REQUEUE):
                dist.barrier()  # only on paths every rank takes together; never wait on a failed peer
            dist.destroy_process_group()


def _train(cfg: Config, rank: int, world: int) -> int:
    import deepspeed

    import data as data_pkg

    _model_name_check(cfg.model.name)
    run_dir = Path(cfg.run.dir).resolve()
    ckpt_dir = run_dir / "checkpoints"
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    t = cfg.train
    global_batch = t.micro_batch * t.grad_accum * world
    if t.global_batch and t.global_batch != global_batch:
        raise ConfigError(f"config key 'train.global_batch'={t.global_batch} but micro_batch*grad_accum*world"
                          f" = {t.micro_batch}*{t.grad_accum}*{world} = {global_batch}")
    if cfg.train.ema and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("config key 'train.ema' is not supported with deepspeed.zero_stage=3 "
                          "(parameters are partitioned); use stage 1 or 2")

    # Resume decision before anything is written (a run dir with checkpoints is resumed, never clobbered).
    resume_tag, resume_dir = None, ckpt_dir
    if cfg.run.resume == "auto":
        resume_tag = ckpt.latest_complete(ckpt_dir)
    elif cfg.run.resume != "never":
        p = Path(cfg.run.resume)
        resume_dir, resume_tag = (p.parent, p.name) if (p / ckpt.COMPLETE).is_file() else (p, ckpt.latest_complete(p))
        if resume_tag is None:
            raise TrainingError(f"run.resume={cfg.run.resume}: no complete checkpoint there")
    elif ckpt.complete_tags(ckpt_dir):
        raise TrainingError(f"run.resume=never but {ckpt_dir} holds checkpoints: use a new run.dir "
                            "or run.resume=auto")
    if resume_tag is not None:
        ckpt.check_world_size(resume_dir, resume_tag, world)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with _run_dir_lock(run_dir, rank):
        if rank == 0:
            _write_provenance(cfg, run_dir)
        torch.manual_seed(cfg.seed + rank)
        import numpy as np
        import random
        np.random.seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)

        # ---- data (input size, mean/std and crop_pct from the model's default cfg unless set)
        pcfg = model_data_cfg(cfg)
        data_cfg = dataclasses.replace(cfg.data, crop_pct=pcfg["crop_pct"])
        loader_kw = dict(img_size=pcfg["img_size"], micro_batch=t.micro_batch, rank=rank, world_size=world,
                         seed=cfg.seed, device=device, model_mean_std=(pcfg["mean"], pcfg["std"]))
        train_loader = data_pkg.build_loader("train", data_cfg, cfg.aug, **loader_kw)
        num_classes = cfg.model.num_classes or train_loader.num_classes
        eval_loader = data_pkg.build_loader("eval", data_cfg, cfg.aug, **loader_kw) if cfg.data.eval else None
        steps_per_epoch = max(len(train_loader) // t.grad_accum, 1)
        total_steps = t.max_steps or int(math.ceil(t.epochs * steps_per_epoch))

        # ---- model, optimizer, DeepSpeed
        model = build_model(cfg, num_classes)
        if cfg.finetune.init and resume_tag is None:
            from finetune.surgery import load_init_weights

            report = load_init_weights(model, cfg, train_loader.label_space)
            log.info("initialised from %s: %s", cfg.finetune.init, report)
        lr = effective_lr(cfg.optim, global_batch)
        optimizer = build_optimizer(model, cfg.optim, lr)
        _no_jit_comm_ops()
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=deepspeed_config(cfg, world))
        scheduler = build_scheduler(optimizer, cfg.sched, total_steps, steps_per_epoch)
        mixup, criterion = _loss_fn(cfg, num_classes)
        ema = None
        if t.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(engine.module, decay=t.ema)
        class_index = eval_class_index(cfg, train_loader.label_space,
                                       eval_loader.label_space if eval_loader else None)
        mean, std = pcfg["mean"], pcfg["std"]

        step, epoch = 0, 0
        if resume_tag is not None:
            common, rank_state = ckpt.load(engine, resume_dir, resume_tag)
            step, epoch = common["step"], common["epoch"]
            train_loader.load_state_dict(rank_state["loader"])
            ckpt.set_rng_state(rank_state["rng"])
            if ema is not None and (resume_dir / resume_tag / "ema.safetensors").is_file():
                from safetensors.torch import load_file

                ema.module.load_state_dict(load_file(str(resume_dir / resume_tag / "ema.safetensors")))
            log.info("resumed from %s at step %d (epoch %d)", resume_dir / resume_tag, step, epoch)
        else:
            train_loader.set_epoch(0)

        logger = RunLogger(run_dir, rank == 0)
        if resume_tag is None:
            logger.text("config", "```\n" + cfg.to_yaml() + "\n```")
        macs = None
        peak = peak_flops(device)
        if peak:
            from models.measure import count_macs

            macs = count_macs(engine.module, pcfg["img_size"])
        log.info("model %s: %.2fM params, %d classes; %d steps (%d per epoch), global batch %d, lr %.3g, "
                 "ZeRO-%d, %s, world %d", cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6,
                 num_classes, total_steps, steps_per_epoch, global_batch, lr, cfg.deepspeed.zero_stage,
                 cfg.precision, world)

        state = _LoopState(step=step, epoch=epoch)
        try:
            return _loop(cfg, engine, scheduler, train_loader, eval_loader, mixup, criterion, ema, class_index,
                         logger, state, total_steps, steps_per_epoch, ckpt_dir, device, dtype, mean, std,
                         macs, peak, world)
        finally:
            logger.close()  # on every path: the process may end without interpreter teardown


class _LoopState:
    def __init__(self, step, epoch):
        self.step = step
        self.epoch = epoch
        self.nonfinite_run = 0
        self.skipped = 0
        self.last_ckpt_time = time.monotonic()
        self.logged_grid = step > 0


def _save(cfg, engine, train_loader, ema, state: _LoopState, ckpt_dir: Path) -> None:
    common = {"step": state.step, "epoch": state.epoch, "config": cfg.to_dict(), "skipped": state.skipped,
              "world_size": dist.get_world_size()}
    rank_state = {"loader": train_loader.state_dict(), "rng": ckpt.rng_state()}
    ema_state = ema.module.state_dict() if ema is not None else None
    tag = ckpt.save(engine, ckpt_dir, state.step, common, rank_state, cfg.checkpoint.keep, ema_state,
                    fault_hook=_crash_hook())
    state.last_ckpt_time = time.monotonic()
    log.info("checkpoint %s written", ckpt_dir / tag)


def _loop(cfg, engine, scheduler, train_loader, eval_loader, mixup, criterion, ema, class_index, logger,
          state: _LoopState, total_steps, steps_per_epoch, ckpt_dir, device, dtype, mean, std, macs, peak,
          world) -> int:
    from tqdm import tqdm

    t = cfg.train
    rank = dist.get_rank()
    nan_steps = _fault_steps()
    timer = StepTimer()
    bar = tqdm(total=total_steps, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True,
               mininterval=2.0, file=sys.stdout)
    engine.train()
    batches = iter(train_loader)
    scheduler.step_update(state.step)
    loss_acc, stop_code, attempt = 0.0, None, 0

    def next_batch():
        # The loader owns the epoch: a new iter() after a finished epoch starts the next one (also when
        # the saved state sat exactly at an epoch end), so the engine only mirrors its counter.
        nonlocal batches
        while True:
            try:
                return next(batches)
            except StopIteration:
                batches = iter(train_loader)
                state.epoch = train_loader.epoch

    while state.step < total_steps:
        # ---- one optimizer step = grad_accum micro-batches
        loss_acc, bad = 0.0, 0.0
        attempt += 1
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            images, labels = next_batch()
            timer.add_data_wait(time.perf_counter() - t0)
            images = images.to(device=device, dtype=dtype, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if not state.logged_grid and cfg.log.image_grid:
                logger.images("train/first_batch", images, mean, std)
                state.logged_grid = True
            if mixup is not None:
                images, labels = mixup(images, labels)
            out = engine(images)
            loss = criterion(out.float(), labels)
            if attempt in nan_steps:
                loss = loss * float("nan")
            flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
            dist.all_reduce(flags)
            if flags.item() > 0:
                # Drop the whole optimizer step on every rank: never backward a non-finite loss.
                bad = 1.0
                break
            engine.backward(loss)
            engine.step()
            loss_acc += loss.detach().float().item() / t.grad_accum
            timer.images += images.shape[0] * world
        if bad:
            if t.grad_accum > 1 and micro > 0:
                raise TrainingError("non-finite loss inside a gradient-accumulation window after earlier "
                                    "micro-batches were accumulated; DeepSpeed cannot discard them. Lower "
                                    "the lr or use train.grad_accum=1 for this run")
            state.nonfinite_run += 1
            state.skipped += 1
            log.warning("non-finite loss at step %d: step skipped (%d in a row, %d total)",
                        state.step + 1, state.nonfinite_run, state.skipped)
            logger.scalars(state.step, {"train/skipped_steps": state.skipped})
            if state.nonfinite_run >= t.max_nonfinite:
                log.error("%d non-finite losses in a row at step %d: stopping without writing a checkpoint "
                          "(the last complete checkpoint is untouched). Lower optim.lr, raise "
                          "train.clip_grad or check the data.", state.nonfinite_run, state.step + 1)
                return EXIT_FAILED
            continue
        state.nonfinite_run = 0
        state.step += 1
        scheduler.step_update(state.step)
        if ema is not None:
            ema.update(engine.module, step=state.step)

        # ---- agree on loss / stop / time-based checkpoint across ranks (one all-reduce)
        time_due = (cfg.checkpoint.every_minutes > 0 and rank == 0 and
                    time.monotonic() - state.last_ckpt_time >= 60 * cfg.checkpoint.every_minutes)
        sync = torch.tensor([loss_acc, float(STOP.requested), float(time_due)], dtype=torch.float64)
        dist.all_reduce(sync)
        loss_mean, stop_now, time_ckpt = sync[0].item() / world, sync[1].item() > 0, sync[2].item() > 0
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            log.error("non-finite gradient norm at step %d: parameters may be corrupt; stopping without "
                      "writing a checkpoint", state.step)
            return EXIT_FAILED

        lr = engine.optimizer.param_groups[0]["lr"]
        logger.scalars(state.step, {"train/loss": loss_mean, "train/lr": lr}, jsonl=True)
        if state.step % cfg.log.every_steps == 0 or state.step == total_steps:
            ips, wait_frac, _ = timer.read()
            values = {"train/grad_norm": grad_norm, "train/images_per_sec": ips,
                      "train/data_wait_frac": wait_frac, "train/skipped_steps": state.skipped,
                      "train/epoch": state.epoch}
            if macs and peak:
                values["train/mfu"] = 3 * 2 * macs * ips / (peak * world)
            logger.scalars(state.step, values)
            bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            timer.reset()
        bar.update(1)

        # ---- evaluation
        if eval_loader is not None and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 \
                and state.step != total_steps:
            _run_eval(engine, ema, eval_loader, device, dtype, class_index, logger, state.step)

        # ---- checkpoints
        done = state.step >= total_steps
        planned_stop = t.stop_at_step and state.step == t.stop_at_step and not done
        every = cfg.checkpoint.every_steps
        if done or stop_now or time_ckpt or planned_stop or (every and state.step % every == 0):
            _save(cfg, engine, train_loader, ema, state, ckpt_dir)
        if stop_now:
            stop_code = EXIT_REQUEUE
            break
        if planned_stop:
            log.info("train.stop_at_step=%d reached: checkpointed, stopping (rerun to continue)", state.step)
            stop_code = EXIT_OK
            break
    bar.close()
    if stop_code is None and eval_loader is not None:
        _run_eval(engine, ema, eval_loader, device, dtype, class_index, logger, state.step)
    logger.flush()
    if stop_code == EXIT_REQUEUE:
        log.warning("stopped on request at step %d after checkpointing; exit %d (requeue me)",
                    state.step, EXIT_REQUEUE)
        dist.barrier()
        STOP.chain_previous()  # submitit's handler (if any) requeues from here, at a step boundary
        return EXIT_REQUEUE
    log.info("finished %d steps", state.step)
    return EXIT_OK


def _run_eval(engine, ema, eval_loader, device, dtype, class_index, logger, step) -> dict:
    res = evaluate(engine.module, eval_loader, device, dtype, class_index)
    if ema is not None:
        ema_res = evaluate(ema.module, eval_loader, device, dtype, class_index)
        res.update({k.replace("eval/", "eval_ema/"): v for k, v in ema_res.items()})
    logger.scalars(step, {k: v for k, v in res.items() if k != "eval/samples"})
    if dist.get_rank() == 0:
        log.info("eval at step %d: %s", step, json.dumps({k: round(v, 3) for k, v in res.items()}))
        with open(Path(logger.writer.log_dir).parent / "eval_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **res}) + "\n")
    return res


def config_from_checkpoint(path: Path) -> Config:
    """The resolved config a run directory or checkpoint was trained with."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        import yaml

        return config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    raise FileNotFoundError(f"no config.yaml in {path}")
