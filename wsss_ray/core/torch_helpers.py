"""Small torch helpers every layer uses: unwrapping DDP, bf16 autocast on CUDA."""

from __future__ import annotations

from typing import Any

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (AMP); a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
