"""The optimiser and its learning-rate schedules, shared by every trainer."""

from __future__ import annotations

import math

import torch

from wsss_ray.core.config_base import OptimizerConfig


def build_optimizer(groups: tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]], config: OptimizerConfig,
                    head_lr_multiplier: float, **impl: bool) -> torch.optim.SGD:
    """SGD over (backbone, head) parameter groups; heads get ``head_lr_multiplier`` × lr (DeepLab, IRN).
    ``impl``: ``foreach=True`` or ``fused=True`` (``training.speed.optimizer_options``), or torch's default."""
    backbone, head = groups
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": config.lr}, {"params": head, "lr": config.lr * head_lr_multiplier}],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **impl)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, power: float) -> float:
    """lr = initial_lr · (1 − step/total)^power, the schedule of DeepLab and all five papers' segmenters."""
    factor = (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def set_warmup_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to initial_lr over ``warmup_steps``, then cosine decay to 0 (CDSP)."""
    if step < warmup_steps:
        factor = (step + 1) / warmup_steps
    else:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def set_lr(optimizer: torch.optim.Optimizer, config: OptimizerConfig, step: int, total_steps: int,
           steps_per_epoch: int) -> float:
    """The configured schedule's lr for global ``step`` (set on every group); returns the backbone's lr."""
    if config.schedule == "warmup_cosine":
        return set_warmup_cosine_lr(optimizer, step, total_steps, config.warmup_epochs * steps_per_epoch)
    return set_poly_lr(optimizer, step, total_steps, config.poly_power)
