"""Segmentation objectives of the plain and noise-robust per-pixel losses (CE with label smoothing, SCE,
curriculum): ``objective(model, batch) -> (loss, terms)`` on the (possibly corrected) pseudo-mask ``label``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from wsss_ray.methods.base import SegmentationObjective
from wsss_ray.methods.robust.config import CrossEntropyConfig, CurriculumConfig, SymmetricCrossEntropyConfig
from wsss_ray.methods.robust.losses import cross_entropy, curriculum_cross_entropy, symmetric_cross_entropy

Terms = dict[str, torch.Tensor]

# OuT's default inflection epoch (``methods/out_correction/config.py``; a family imports no other: the declarations test
# checks the two agree).
OUT_INFLECTION_EPOCH = 4


class PixelLossObjective(SegmentationObjective):
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
    """The curriculum loss from ``start_epoch`` on, the plain CE mean before it. The trainer tells it the epoch
    through :meth:`set_epoch` (like ``DistributedSampler.set_epoch``)."""

    @classmethod
    def resolve(cls, config: CurriculumConfig, corrector: Any) -> CurriculumConfig:
        """``start_epoch: inflection`` becomes the corrector's ``inflection_epoch``, or OuT's default one without
        a corrector (the epoch from which OuT finds the net memorising noise)."""
        if config.start_epoch != "inflection":
            return config
        epoch = getattr(corrector, "inflection_epoch", None) or OUT_INFLECTION_EPOCH
        return config.model_copy(update={"start_epoch": epoch})

    def __init__(self, config: CurriculumConfig, num_classes: int = 0, feature_channels: int = 0) -> None:
        if config.start_epoch == "inflection":
            raise ValueError("train_seg.loss.start_epoch: 'inflection' must be resolved to an epoch by the "
                             "train_seg stage before the objective is built")
        super().__init__(self._loss)
        self.config = config
        self.start_epoch = int(config.start_epoch)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch the coming steps belong to."""
        self.epoch = epoch

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.start_epoch and self.epoch is None:
            raise RuntimeError(f"train_seg.loss.start_epoch is {self.start_epoch}, but the trainer never called "
                               "set_epoch on the curriculum objective")
        # ϵ = 0 drops nothing: the plain CE mean over labelled pixels.
        epsilon = self.config.epsilon if (self.epoch or 0) >= self.start_epoch else 0.0
        return curriculum_cross_entropy(logits, target, epsilon, self.config.rank)
