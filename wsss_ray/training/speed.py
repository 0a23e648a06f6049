"""The speed options of a training step (:class:`~wsss_ray.core.config_base.SpeedConfig`), applied on CUDA only.

Each option is a config field whose default is what a profile on the target GPU shows wins
(``bench/gpu_check.py``'s speed-options row measures them on and off, side by side). On CPU every option is
ignored: the CPU step is torch's eager default, bit for bit, whatever the config says.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wsss_ray.core.config_base import SpeedConfig


def active(speed: SpeedConfig, device: torch.device) -> SpeedConfig:
    """The options that take effect on ``device``: all of them on CUDA, none elsewhere."""
    return speed if device.type == "cuda" else SpeedConfig()


def prepare_step(step: nn.Module, speed: SpeedConfig, device: torch.device) -> nn.Module:
    """``step`` on ``device`` in the configured layout (before DDP wraps it), with cuDNN's autotuner set."""
    speed = active(speed, device)
    step = step.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    if speed.channels_last:
        step = step.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return step


def optimizer_options(speed: SpeedConfig, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for ``torch.optim.SGD`` choosing its implementation (none: torch's default)."""
    impl = active(speed, device).optimizer_impl
    return {} if impl == "auto" else {impl: True}


def compile_step(ddp_step: nn.Module, speed: SpeedConfig, device: torch.device) -> nn.Module:
    """The step module the loop calls: ``torch.compile`` d when configured on CUDA (checkpoints keep using the
    unwrapped module, so their keys do not change)."""
    if not active(speed, device).compile:
        return ddp_step
    return torch.compile(ddp_step)  # type: ignore[return-value]
