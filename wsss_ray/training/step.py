"""One training step's module: the model and its objective, wrapped together for DDP.

An objective is an ``nn.Module`` called as ``objective(model, batch) -> (loss, terms)`` (the method folders hold
them). The trainer wraps model and objective in one module so that DistributedDataParallel synchronises both
(LoRM has parameters of its own) and every forward pass of a step — KTSE runs three — happens inside DDP's single
``forward``. An objective whose loss changes with the epoch (KTSE's warm-up) defines ``set_epoch(epoch)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Terms = dict[str, torch.Tensor]


class TrainStep(nn.Module):
    """The model and its objective as one module: ``forward(batch) -> (loss, terms)``."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return self.objective(self.model, batch)

    def set_epoch(self, epoch: int) -> None:
        """Tell the objective which 0-based epoch starts, like torch's ``DistributedSampler.set_epoch``: an
        objective with a schedule (KTSE's warm-up) defines ``set_epoch(epoch)``; the others need nothing."""
        set_epoch = getattr(self.objective, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The model's (backbone, head) groups; an objective's own parameters train with the head."""
        backbone, head = self.model.parameter_groups()
        return backbone, head + list(self.objective.parameters())
