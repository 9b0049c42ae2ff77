"""The Trainer: timm model -> DeepSpeed (ZeRO / bf16) -> train/eval loop with exact resume.

``train(cfg)`` is the one entry point (``python -m pretrain``, ``python -m finetune``, submitit jobs).
The :class:`Trainer` owns its components as attributes (DeepSpeed engine, loaders, scheduler, EMA,
logger, checkpointer, timer) and runs ``fit()`` = repeated ``train_step()`` + ``evaluate()`` + ``save()``.
Per optimizer step every rank all-reduces one small tensor [loss, stop-request, time-to-checkpoint], so
all ranks take the same decisions (skip, checkpoint, stop) at the same step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.distributed import init_distributed
from launch.signals import EXIT_REQUEUE, STOP
from pretrain import elastic
from pretrain import engine as E
from pretrain.config import Config, ConfigError, resolve_grad_accum
from pretrain.engine import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, TrainingError
from pretrain.metrics import RunLogger, StepTimer, peak_flops
from pretrain.optim import build_optimizer, build_scheduler, effective_lr
from pretrain.precision import agree_all, resolve_precision
from pretrain.rundir import (Checkpointer, CheckpointError, RunDir, is_complete, latest_complete, rng_state,
                             set_rng_state,
                             verify_problem)

log = logging.getLogger("pretrain")


@dataclasses.dataclass
class TrainState:
    """What the loop counts; ``step``/``epoch``/``skipped`` are checkpointed."""
    step: int = 0
    epoch: int = 0
    skipped: int = 0
    nonfinite_run: int = 0
    attempt: int = 0  # optimizer-step attempts of this process (fault injection counts them)
    logged_grid: bool = False
    last_ckpt_time: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class StepResult:
    loss: float  # mean over ranks
    stop_requested: bool
    checkpoint_due: bool  # time-based checkpoint (rank 0's clock, agreed by all)


def resume_target(cfg: Config, run: RunDir) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) to resume from, or None for a fresh run; decided before anything is written
    (a run directory with checkpoints is resumed, never clobbered)."""
    if cfg.run.resume == "auto":
        tag = run.latest_complete()
        return (run.ckpt_dir, tag) if tag else None
    if cfg.run.resume == "never":
        if run.complete_tags():
            raise TrainingError(f"run.resume=never but {run.ckpt_dir} holds checkpoints: use a new run.dir "
                                "or run.resume=auto")
        return None
    p = Path(cfg.run.resume)
    ckpt_dir, tag = (p.parent, p.name) if is_complete(p) else (p, latest_complete(p))
    if tag is None:
        raise TrainingError(f"run.resume={cfg.run.resume}: no complete checkpoint there")
    return ckpt_dir, tag


class Trainer:
    """One training run on this rank. Build with :meth:`setup` inside an ``ExitStack`` (it holds the
    run-directory lock), then :meth:`fit`."""

    def __init__(self, cfg: Config, rank: int, world: int):
        accum = resolve_grad_accum(cfg.train, world)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
        self.cfg, self.rank, self.world = cfg, rank, world
        self.run = RunDir(cfg.run.dir)
        self.device = E.local_device()
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        t = cfg.train
        self.global_batch = t.micro_batch * t.grad_accum * world
        self.state = TrainState()
        self.timer = StepTimer()
        self.nan_attempts = E.fault_nan_steps()
        self.ckpt = Checkpointer(self.run.ckpt_dir, cfg.checkpoint.keep, fault_hook=E.fault_crash_hook())

    # ------------------------------------------------------------------------------------ setup
    def setup(self, stack: contextlib.ExitStack) -> "Trainer":
        """Everything that can refuse the config runs before the run directory is created or written."""
        self._check_config()
        self.resume_from = resume_target(self.cfg, self.run)
        self.reshape = None  # another world size / grad_accum than the checkpoint's (pretrain/elastic.py)
        if self.resume_from is not None:
            self.reshape = elastic.plan(self.cfg, *self.resume_from, self.world)
            if self.reshape is not None:
                self.cfg, self.global_batch = elastic.apply(self.cfg, self.reshape), self.reshape.global_batch
        self._seed()
        self._build_data()
        self.model = E.build_model(self.cfg, self.num_classes)
        if self.rank == 0:
            self.run.path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        stack.enter_context(self.run.lock(self.rank))
        if self.rank == 0:
            self.run.write_config(self.cfg)
            if self.cfg.run.provenance:
                self.run.write_provenance()
        self._build_engine()
        if self.resume_from is not None:
            self.resume(*self.resume_from)
        else:
            self.train_loader.set_epoch(0)
        self.logger = RunLogger(self.run, self.rank == 0)
        stack.callback(self.logger.close)  # on every path: the process may end without interpreter teardown
        if self.resume_from is None:
            self.logger.text("config", "```\n" + self.cfg.to_yaml() + "\n```")
        self.state.logged_grid = self.state.step > 0
        self._log_summary()
        return self

    def _check_config(self) -> None:
        cfg = self.cfg
        E.check_model_name(cfg.model.name)
        if cfg.train.ema and cfg.deepspeed.zero_stage == 3:
            raise ConfigError("config key 'train.ema' is not supported with deepspeed.zero_stage=3 "
                              "(parameters are partitioned); use stage 1 or 2")

    def _seed(self) -> None:
        seed = self.cfg.seed + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _build_data(self) -> None:
        """Loaders with the model's input size, mean/std and crop_pct (its timm default cfg unless set)."""
        from data import DatasetNotFoundError, build_loader

        cfg, t = self.cfg, self.cfg.train
        self.pcfg = E.model_data_cfg(cfg)
        data_cfg = dataclasses.replace(cfg.data, crop_pct=self.pcfg["crop_pct"])
        kw = dict(img_size=self.pcfg["img_size"], micro_batch=t.micro_batch, rank=self.rank,
                  world_size=self.world, seed=cfg.seed, device=self.device,
                  model_mean_std=(self.pcfg["mean"], self.pcfg["std"]))
        split = "train"
        try:
            self.train_loader = build_loader("train", data_cfg, cfg.aug, grad_accum=t.grad_accum, **kw)
            split = "eval"
            self.eval_loader = build_loader("eval", data_cfg, cfg.aug, **kw) if cfg.data.eval else None
        except DatasetNotFoundError as e:
            raise ConfigError(f"config key 'data.{split}': {e}") from None
        self._check_same_data()
        self.num_classes = cfg.model.num_classes or self.train_loader.num_classes
        self.steps_per_epoch = max(len(self.train_loader) // t.grad_accum, 1)
        self.total_steps = t.max_steps or int(math.ceil(t.epochs * self.steps_per_epoch))
        self.class_index = E.eval_class_index(cfg, self.train_loader.label_space,
                                              self.eval_loader.label_space if self.eval_loader else None)

    def _check_same_data(self) -> None:
        """Every rank indexed the shards on its own (a stale index cache on one node would mean training on
        different data): compare a hash of the validated sample table across ranks."""
        h = torch.tensor([self.train_loader.sample_table_hash()] * 2, dtype=torch.int64)
        lo, hi = h[:1].clone(), h[1:].clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise TrainingError("the ranks indexed different training samples from the same shards (a stale or "
                                "foreign index cache, or shards changing under the job); clear the cache "
                                "($HVP_DATA_CACHE, else $XDG_CACHE_HOME/hvp or ~/.cache/hvp) and restart")

    def _build_engine(self) -> None:
        """Finetune init (fresh runs), optimizer, DeepSpeed, per-step schedule, loss, EMA."""
        import deepspeed

        cfg = self.cfg
        if cfg.finetune.init and self.resume_from is None:
            from pretrain.surgery import load_init_weights

            report = load_init_weights(self.model, cfg, self.train_loader.label_space)
            log.info("initialised from %s: %s", cfg.finetune.init, report)
        self.lr = effective_lr(cfg.optim, self.global_batch)
        optimizer = build_optimizer(self.model, cfg.optim, self.lr)
        E.no_jit_comm_ops()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer,
            config=elastic.deepspeed_config(E.deepspeed_config(cfg, self.world), self.reshape))
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.total_steps, self.steps_per_epoch)
        self.mixup, self.criterion = E.build_loss(cfg, self.num_classes)
        self.ema = None
        if cfg.train.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.engine.module, decay=cfg.train.ema)
        if cfg.train.compile:
            # DeepSpeed's own entry: compiles engine.module in place (nn.Module.compile), so the forward of
            # training and evaluation both run the compiled graph; the EMA copy above stays eager.
            self.engine.compile(backend=cfg.train.compile_backend)
        self.macs, self.peak = None, peak_flops(self.device)
        if self.peak:
            from models.measure import count_macs

            self.macs = count_macs(self.engine.module, self.pcfg["img_size"])

    def _log_summary(self) -> None:
        cfg = self.cfg
        log.info("model %s: %.2fM params, %d classes; %d steps (%d per epoch), global batch %d, lr %.3g, "
                 "ZeRO-%d, %s, world %d", cfg.model.name, sum(p.numel() for p in self.model.parameters()) / 1e6,
                 self.num_classes, self.total_steps, self.steps_per_epoch, self.global_batch, self.lr,
                 cfg.deepspeed.zero_stage, cfg.precision, self.world)

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Collective checkpoint of engine, loop state, every rank's loader/RNG state and EMA."""
        s = self.state
        common = {"step": s.step, "epoch": s.epoch, "config": self.cfg.to_dict(), "skipped": s.skipped,
                  "world_size": self.world}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": rng_state()}
        ema_state = self.ema.module.state_dict() if self.ema is not None else None
        tag = self.ckpt.save(self.engine, s.step, common, rank_state, ema_state)
        s.last_ckpt_time = time.monotonic()
        log.info("checkpoint %s written", self.ckpt.ckpt_dir / tag)

    def resume(self, ckpt_dir: Path, newest: str) -> None:
        """Resume from the newest checkpoint of ``ckpt_dir`` that verifies and loads (collective: all ranks
        agree on every decision). One that does not is logged with the reason, and in the run's own folder
        renamed ``corrupt-TAG`` so later resumes skip it; then the next older one is tried."""
        own = Path(ckpt_dir).resolve() == self.ckpt.ckpt_dir.resolve()
        ckpt = self.ckpt if own else Checkpointer(ckpt_dir)
        tags = [newest] + [t for t in ckpt.candidates() if t != newest]
        for tag in tags:
            why = verify_problem(ckpt.ckpt_dir / tag) or self._load_agreed(ckpt, tag)
            if why is None:
                return
            if own:
                ckpt.quarantine(tag, why)
            elif self.rank == 0:
                log.warning("checkpoint %s cannot be resumed (%s); trying the next older one", ckpt_dir / tag, why)
        raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies and loads (tried {', '.join(tags)}); "
                              "see the warnings above. Nothing was trained.")

    def _load_agreed(self, ckpt: Checkpointer, tag: str) -> str | None:
        """Load ``tag`` on every rank; the first rank's error message when any rank failed, else None."""
        error = None
        try:
            self._load(ckpt, tag)
        except Exception as e:  # noqa: BLE001 - any failure to load means: try an older checkpoint
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def _load(self, ckpt: Checkpointer, tag: str) -> None:
        ckpt_dir = ckpt.ckpt_dir
        common, rank_state = (elastic.load(ckpt, tag, self.engine, self.reshape, self.rank, self.cfg.seed)
                              if self.reshape is not None else ckpt.load(self.engine, tag))
        self.state.step, self.state.epoch = common["step"], common["epoch"]
        self.state.skipped = common.get("skipped", 0)
        self.train_loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        ema = ckpt.load_ema(tag) if self.ema is not None else None
        if ema is not None:
            self.ema.module.load_state_dict(ema)
        log.info("resumed from %s at step %d (epoch %d)", Path(ckpt_dir) / tag, self.state.step, self.state.epoch)

    # ------------------------------------------------------------------------------------ the loop
    def fit(self) -> int:
        """Train to ``total_steps`` (or a stop request / planned stop); returns the exit code."""
        from tqdm import tqdm

        s = self.state
        bar = tqdm(total=self.total_steps, initial=s.step, disable=self.rank != 0, desc="train",
                   dynamic_ncols=True, mininterval=2.0, file=sys.stdout)
        self.engine.train()
        self._batches = iter(self.train_loader)
        self.scheduler.step_update(s.step)
        compile_reported = False
        while s.step < self.total_steps:
            result = self.train_step()
            if result is None:  # non-finite loss: step skipped on every rank
                if s.nonfinite_run >= self.cfg.train.max_nonfinite:
                    log.error("%d non-finite losses in a row at step %d: stopping without writing a checkpoint "
                              "(the last complete checkpoint is untouched). Lower optim.lr, raise "
                              "train.clip_grad or check the data.", s.nonfinite_run, s.step + 1)
                    return EXIT_FAILED
                continue
            self._log_step(result, bar)
            if self.cfg.train.compile and not compile_reported:
                _log_compiled_graphs(self.cfg.train.compile_backend)
                compile_reported = True
            code = self._after_step(result)
            if code is not None:
                bar.close()
                return code
        bar.close()
        if self.eval_loader is not None:
            self.evaluate()
        self.logger.flush()
        log.info("finished %d steps", s.step)
        return EXIT_OK

    def _next_batch(self):
        # The loader owns the epoch: a new iter() after a finished epoch starts the next one (also when
        # the saved state sat exactly at an epoch end), so the trainer only mirrors its counter.
        while True:
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = iter(self.train_loader)
                self.state.epoch = self.train_loader.epoch

    def _forward_loss(self, images, labels):
        images = images.to(device=self.device, dtype=self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if not self.state.logged_grid and self.cfg.log.image_grid:
            self.logger.images("train/first_batch", images, self.pcfg["mean"], self.pcfg["std"])
            self.state.logged_grid = True
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        loss = self.criterion(self.engine(images).float(), labels)
        if self.state.attempt in self.nan_attempts:
            loss = loss * float("nan")
        return loss, images.shape[0]

    def train_step(self) -> StepResult | None:
        """One optimizer step = ``grad_accum`` micro-batches; None when a non-finite loss skipped it."""
        s, accum = self.state, self.cfg.train.grad_accum
        s.attempt += 1
        loss_acc = 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            images, labels = self._next_batch()
            self.timer.add_data_wait(time.perf_counter() - t0)
            loss, n = self._forward_loss(images, labels)
            if not _all_finite(loss):  # drop the whole step on every rank: never backward a non-finite loss
                self._skip_step(micro)
                return None
            self.engine.backward(loss)
            self.engine.step()
            loss_acc += loss.detach().float().item() / accum
            self.timer.images += n * self.world
        s.nonfinite_run = 0
        s.step += 1
        self.scheduler.step_update(s.step)
        if self.ema is not None:
            self.ema.update(self.engine.module, step=s.step)
        time_due = (self.cfg.checkpoint.every_minutes > 0 and self.rank == 0 and
                    time.monotonic() - s.last_ckpt_time >= 60 * self.cfg.checkpoint.every_minutes)
        sync = torch.tensor([loss_acc, float(STOP.requested), float(time_due)], dtype=torch.float64)
        dist.all_reduce(sync)
        return StepResult(sync[0].item() / self.world, sync[1].item() > 0, sync[2].item() > 0)

    def _skip_step(self, micro: int) -> None:
        s = self.state
        if self.cfg.train.grad_accum > 1 and micro > 0:
            raise TrainingError("non-finite loss inside a gradient-accumulation window after earlier "
                                "micro-batches were accumulated; DeepSpeed cannot discard them. Lower "
                                "the lr or use train.grad_accum=1 for this run")
        s.nonfinite_run += 1
        s.skipped += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row, %d total)",
                    s.step + 1, s.nonfinite_run, s.skipped)
        self.logger.scalars(s.step, {"train/skipped_steps": s.skipped})

    def _log_step(self, r: StepResult, bar) -> None:
        s = self.state
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient norm at step {s.step}: parameters may be corrupt; "
                                "stopping without writing a checkpoint")
        lr = self.engine.optimizer.param_groups[0]["lr"]
        self.logger.scalars(s.step, {"train/loss": r.loss, "train/lr": lr}, jsonl=True)
        if s.step % self.cfg.log.every_steps == 0 or s.step == self.total_steps:
            ips, wait_frac, _ = self.timer.read()
            values = {"train/grad_norm": grad_norm, "train/images_per_sec": ips,
                      "train/data_wait_frac": wait_frac, "train/skipped_steps": s.skipped, "train/epoch": s.epoch}
            if self.macs and self.peak:
                values["train/mfu"] = 3 * 2 * self.macs * ips / (self.peak * self.world)
            self.logger.scalars(s.step, values)
            bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            self.timer.reset()
        bar.update(1)

    def _eval_due(self) -> bool:
        """``eval.every_steps`` and, with ``eval.every_epoch``, each epoch end (in optimizer steps); the
        final evaluation after the last step is ``fit``'s."""
        s, ev = self.state, self.cfg.eval
        if self.eval_loader is None or s.step >= self.total_steps:
            return False
        return bool((ev.every_steps and s.step % ev.every_steps == 0)
                    or (ev.every_epoch and s.step % self.steps_per_epoch == 0))

    def _after_step(self, r: StepResult) -> int | None:
        """Evaluation and checkpoints after a step; an exit code when the run stops here."""
        s, t = self.state, self.cfg.train
        if self._eval_due():
            self.evaluate()
        done = s.step >= self.total_steps
        planned_stop = bool(t.stop_at_step and s.step == t.stop_at_step and not done)
        every = self.cfg.checkpoint.every_steps
        if done or r.stop_requested or r.checkpoint_due or planned_stop or (every and s.step % every == 0):
            self.save()
        if r.stop_requested:
            self.logger.flush()
            log.warning("stopped on request at step %d after checkpointing; exit %d (requeue me)",
                        s.step, EXIT_REQUEUE)
            dist.barrier()
            STOP.chain_previous()  # submitit's handler (if any) requeues from here, at a step boundary
            return EXIT_REQUEUE
        if planned_stop:
            self.logger.flush()
            log.info("train.stop_at_step=%d reached: checkpointed, stopping (rerun to continue)", s.step)
            return EXIT_OK
        return None

    def evaluate(self) -> dict:
        """Top-1/top-5 of the model (and its EMA) on the eval loader, logged at the current step."""
        s = self.state
        res = E.evaluate(self.engine.module, self.eval_loader, self.device, self.dtype, self.class_index)
        if self.ema is not None:
            ema_res = E.evaluate(self.ema.module, self.eval_loader, self.device, self.dtype, self.class_index)
            res.update({k.replace("eval/", "eval_ema/"): v for k, v in ema_res.items()})
        self.logger.scalars(s.step, {k: v for k, v in res.items() if k != "eval/samples"})
        if self.rank == 0:
            log.info("eval at step %d: %s", s.step, json.dumps({k: round(v, 3) for k, v in res.items()}))
            with open(self.run.eval_log, "a") as f:
                f.write(json.dumps({"step": s.step, **res}) + "\n")
        return res


def _log_compiled_graphs(backend: str) -> None:
    """After the first compiled step: how many graphs Dynamo captured and how many breaks split them (one
    graph and no break is what every family gives; more means a change brought Python back into the step)."""
    from torch._dynamo.utils import counters

    log.info("torch.compile (backend %s): %d graph(s), %d graph break(s) after the first step", backend,
             counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


def _all_finite(loss: torch.Tensor) -> bool:
    flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    dist.all_reduce(flags)
    return flags.item() == 0


def _resolve_precision(cfg: Config, rank: int) -> Config:
    value, why = resolve_precision(cfg.precision, E.local_device(), agree=agree_all)
    if rank == 0:
        log.info("precision %s (%s%s)", value, "auto: " if cfg.precision == "auto" else "", why)
    return dataclasses.replace(cfg, precision=value)


def train(cfg: Config) -> int:
    """Run (or resume) training as configured; returns the process exit code."""
    env = init_distributed(cfg.launch.backend, cfg.launch.timeout_minutes)
    E.quiet_libraries(env.rank)
    STOP.install()
    code = EXIT_FAILED
    try:
        with contextlib.ExitStack() as stack:
            cfg = _resolve_precision(cfg, env.rank)
            trainer = Trainer(cfg, env.rank, env.world_size)
            code = trainer.setup(stack).fit()
        return code
    except (ConfigError, TrainingError, CheckpointError) as e:
        log.error("%s", e)
        code = EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_FAILED
        return code
    finally:
        STOP.restore()
        if dist.is_initialized():
            if code in (EXIT_OK, EXIT_REQUEUE):
                dist.barrier()  # only on paths every rank takes together; never wait on a failed peer
            dist.destroy_process_group()
