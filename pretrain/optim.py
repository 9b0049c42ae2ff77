"""Optimizer (torch's AdamW or QHM as DeepSpeed client optimizer) and the per-step lr schedule.

Parameter groups come from timm: no weight decay for 1-D parameters (norms, biases) and the model's
``no_weight_decay()`` names (position/bias tables, tokens); layer-wise lr decay through the model's
``group_matcher``. A client optimizer keeps DeepSpeed from JIT-compiling its fused/CPU Adam ops.
"""
from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler


class QHM(torch.optim.Optimizer):
    """Quasi-hyperbolic momentum (Ma & Yarats, 2019), as used by the ViL release for 384 finetuning.

    ``g_t = beta * g_{t-1} + (1 - beta) * grad``; ``p -= lr * ((1 - nu) * grad + nu * g_t)``, with
    decoupled-free L2 weight decay added to the gradient (the release's convention). No maintained
    package ships QHM for current torch, and it is a dozen lines.
    """

    def __init__(self, params, lr=0.01, momentum=0.9, nu=1.0, weight_decay=0.0):
        if lr <= 0 or not 0 <= momentum < 1 or not 0 <= nu <= 1:
            raise ValueError(f"invalid QHM settings lr={lr} momentum={momentum} nu={nu}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta, nu, lr, wd = group["momentum"], group["nu"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if wd:
                    d_p = d_p.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(beta).add_(d_p, alpha=1.0 - beta)
                p.add_(d_p, alpha=-lr * (1.0 - nu))
                p.add_(buf, alpha=-lr * nu)
        return loss


def effective_lr(optim_cfg, global_batch: int) -> float:
    """The papers' convention: lr = base_lr * global_batch / base (when lr_scaling_base is set)."""
    if optim_cfg.lr_scaling_base:
        return optim_cfg.lr * global_batch / optim_cfg.lr_scaling_base
    return optim_cfg.lr


def build_param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if optim_cfg.layer_decay and optim_cfg.layer_decay < 1.0:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"optim.layer_decay needs a model with group_matcher(); "
                             f"{type(model).__name__} has none")
        return param_groups_layer_decay(model, weight_decay=optim_cfg.weight_decay,
                                        no_weight_decay_list=no_decay, layer_decay=optim_cfg.layer_decay)
    return param_groups_weight_decay(model, weight_decay=optim_cfg.weight_decay, no_weight_decay_list=no_decay)


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    groups = build_param_groups(model, optim_cfg)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "qhm":
        return QHM(groups, lr=lr, momentum=optim_cfg.momentum, nu=optim_cfg.nu,
                   weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}")


def warmup_steps(sched_cfg, steps_per_epoch: int) -> int:
    if sched_cfg.warmup_steps is not None:
        return sched_cfg.warmup_steps
    if sched_cfg.warmup_epochs is not None:
        return int(round(sched_cfg.warmup_epochs * steps_per_epoch))
    return 0


def build_scheduler(optimizer, sched_cfg, total_steps: int, steps_per_epoch: int) -> CosineLRScheduler:
    """timm's cosine schedule with linear warm-up, stepped per optimizer step (``step_update``)."""
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=sched_cfg.min_lr,
                             warmup_t=warmup_steps(sched_cfg, steps_per_epoch),
                             warmup_lr_init=sched_cfg.warmup_lr, warmup_prefix=False, t_in_epochs=False)
