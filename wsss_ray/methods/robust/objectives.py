"""Segmentation objectives of the plain and noise-robust per-pixel losses (CE with label smoothing, SCE,
curriculum): ``objective(model, batch) -> (loss, terms)`` on the (possibly corrected) pseudo-mask ``label``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from wsss_ray.methods.robust.config import CrossEntropyConfig, CurriculumConfig, SymmetricCrossEntropyConfig
from wsss_ray.methods.robust.losses import cross_entropy, curriculum_cross_entropy, symmetric_cross_entropy

Terms = dict[str, torch.Tensor]


class PixelLossObjective(nn.Module):
    """A per-pixel loss of the logits against the (possibly corrected) pseudo-mask ``label``."""

    maps: ClassVar[tuple[str, ...]] = ("label",)

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return self.loss(model(batch["image"]).float(), batch["label"].long()), {}


class CrossEntropyObjective(PixelLossObjective):
    def __init__(self, config: CrossEntropyConfig, num_classes: int = 0, feature_channels: int = 0) -> None:
        super().__init__(cross_entropy(config))


class SceObjective(PixelLossObjective):
    def __init__(self, config: SymmetricCrossEntropyConfig, num_classes: int = 0, feature_channels: int = 0) -> None:
        super().__init__(lambda logits, target: symmetric_cross_entropy(
            logits, target, alpha=config.alpha, beta=config.beta, log_clip=config.log_clip))


class CurriculumObjective(PixelLossObjective):
    def __init__(self, config: CurriculumConfig, num_classes: int = 0, feature_channels: int = 0) -> None:
        super().__init__(lambda logits, target: curriculum_cross_entropy(logits, target, config.epsilon))
