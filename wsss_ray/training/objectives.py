"""Training objectives: what one step computes from the model and a batch, chosen by ``<stage>.loss.name``.

An objective is an ``nn.Module`` called as ``objective(model, batch) -> (loss, terms)``. ``batch`` holds tensors on
the training device: ``image`` (normalised, N×3×H×W) plus the columns the objective declares (``maps``: per-pixel
maps cropped together with the image, e.g. the pseudo-mask ``label`` or BANA's ``retrieved``; classifier targets).
``terms`` are detached scalars logged per epoch. The trainer wraps model and objective in one module
(:class:`TrainStep`) so that DistributedDataParallel synchronises both (LoRM has parameters of its own) and every
forward pass of a step — KTSE runs three — happens inside DDP's single ``forward``.

The maths lives in the method modules (``losses``, ``noise_robust``, ``cdsp``, ``ktse``, ``bap``) as pure tested
functions; this module only wires them to batch columns.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.config import (
    BapLossConfig,
    CdspConfig,
    ClassifierTrainConfig,
    CrossEntropyConfig,
    CurriculumConfig,
    KtseLossConfig,
    MspnLossConfig,
    NoiseAwareConfig,
    SegLossConfig,
    SymmetricCrossEntropyConfig,
)
from wsss_ray.data.classes import IGNORE_LABEL
from wsss_ray.training.bap import BapObjective
from wsss_ray.training.cdsp import LoRM, distance_entropy_loss, partial_cross_entropy, smoothed_cross_entropy
from wsss_ray.training.ktse import KtseObjective
from wsss_ray.training.losses import cross_entropy
from wsss_ray.training.noise_robust import (
    curriculum_cross_entropy,
    decode_proposed,
    mspn_hybrid_loss,
    noise_aware_loss,
    symmetric_cross_entropy,
)

Terms = dict[str, torch.Tensor]


class TrainStep(nn.Module):
    """The model and its objective as one module: ``forward(batch) -> (loss, terms)``."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return self.objective(self.model, batch)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The model's (backbone, head) groups; an objective's own parameters train with the head."""
        backbone, head = self.model.parameter_groups()
        return backbone, head + list(self.objective.parameters())


# --------------------------------------------------------------------------------------------- classifiers


class MultiLabelObjective(nn.Module):
    """Multi-label soft-margin loss on the head's image logits (the GAP baseline; any head)."""

    maps: ClassVar[tuple[str, ...]] = ()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return F.multilabel_soft_margin_loss(model(batch["image"]).float(), batch["target"]), {}


def build_classifier_objective(config: ClassifierTrainConfig) -> nn.Module:
    if isinstance(config.loss, KtseLossConfig):
        return _as_module(KtseObjective(config.loss))
    if isinstance(config.loss, BapLossConfig):
        return _as_module(BapObjective(config.loss, config.head))
    return MultiLabelObjective()


class _CallableObjective(nn.Module):
    """Wraps a plain callable objective so it sits in :class:`TrainStep` like the others."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return self.fn(model, batch)


def _as_module(objective: Any) -> nn.Module:
    return objective if isinstance(objective, nn.Module) else _CallableObjective(objective)


# --------------------------------------------------------------------------------------------- segmentation


class PixelLossObjective(nn.Module):
    """A per-pixel loss of the logits against the (possibly corrected) pseudo-mask ``label``."""

    maps: ClassVar[tuple[str, ...]] = ("label",)

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return self.loss(model(batch["image"]).float(), batch["label"].long()), {}


def cross_entropy_objective(config: CrossEntropyConfig) -> nn.Module:
    return PixelLossObjective(cross_entropy(config))


def sce_objective(config: SymmetricCrossEntropyConfig) -> nn.Module:
    return PixelLossObjective(lambda logits, target: symmetric_cross_entropy(
        logits, target, alpha=config.alpha, beta=config.beta, log_clip=config.log_clip))


def curriculum_objective(config: CurriculumConfig) -> nn.Module:
    return PixelLossObjective(lambda logits, target: curriculum_cross_entropy(logits, target, config.epsilon))


class NoiseAwareObjective(nn.Module):
    """BANA's NAL over Y_crf (``label``) and Y_ret (``retrieved``), with the segmenter's features and weights."""

    maps: ClassVar[tuple[str, ...]] = ("label", "retrieved")

    def __init__(self, config: NoiseAwareConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        out = model(batch["image"], with_features=True)
        return noise_aware_loss(out["logits"].float(), out["features"].float(), model.classifier_weight().float(),
                                batch["label"].long(), batch["retrieved"].long(), gamma=self.config.gamma,
                                lambda_wce=self.config.lambda_wce)


class CdspObjective(nn.Module):
    """CDSP: partial CE on scribbles + label-smoothed CE on the pseudo-mask, + LoRM, + distance entropy."""

    maps: ClassVar[tuple[str, ...]] = ("label", "scribble", "dist_scribble", "dist_boundary")

    def __init__(self, config: CdspConfig, feature_channels: int) -> None:
        super().__init__()
        self.config = config
        self.lorm = LoRM(feature_channels, config.lorm_channels) if config.lorm else None

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        cfg = self.config
        out = model(batch["image"], with_features=True)
        logits, label = out["logits"].float(), batch["label"].long()
        partial = partial_cross_entropy(logits, batch["scribble"].long())
        smoothed = smoothed_cross_entropy(logits, label, cfg.label_smoothing)
        loss = partial + smoothed
        terms: Terms = {"partial_ce": partial.detach(), "smoothed_ce": smoothed.detach()}
        if self.lorm is not None:
            features = out["features"].float()
            # The pseudo-label's foreground at the feature map's stride (nearest: a label map is not averaged).
            small = F.interpolate(label[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0]
            foreground = ((small != 0) & (small != IGNORE_LABEL)).float()
            lorm = self.lorm(features, foreground)
            loss = loss + cfg.lorm_weight * lorm
            terms["lorm"] = lorm.detach()
        if cfg.distance:
            de, de_terms = distance_entropy_loss(logits, batch["dist_scribble"].float() / 255.0,
                                                 batch["dist_boundary"].float() / 255.0)
            loss = loss + cfg.distance_weight * de
            terms.update({f"de_{k}": v for k, v in de_terms.items()})
        return loss, terms


class MspnObjective(nn.Module):
    """MSPN positive–negative hybrid learning over the seeds' vote (majority, agreement, proposals)."""

    maps: ClassVar[tuple[str, ...]] = ("majority", "agreement", "proposed")

    def __init__(self, config: MspnLossConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        cfg = self.config
        label_lists = batch["label_list"].long()
        present = batch["present"].bool()
        proposed = decode_proposed(batch["proposed"].long(), label_lists, self.num_classes)
        # Labels of the image beyond the bitmask's 8 have no proposal bit: count them as proposed, so indirect
        # negative learning never pushes down a label the seeds may well have voted for.
        listed = torch.zeros_like(present)
        listed.scatter_(1, label_lists.clamp_min(0), label_lists >= 0)
        proposed = proposed | (present & ~listed)[:, :, None, None]
        # Crop padding has no vote: majority 255, agreement 0 and no proposal (excluded from every term).
        return mspn_hybrid_loss(model(batch["image"]).float(), batch["majority"].long(), batch["agreement"].long(),
                                proposed, present, agreement_threshold=cfg.agreement,
                                negative_weight=cfg.negative_weight, indirect_weight=cfg.indirect_weight,
                                constraint_weight=cfg.constraint_weight)


def build_segmentation_objective(config: SegLossConfig, num_classes: int, feature_channels: int) -> nn.Module:
    """The objective of ``train_seg.loss``; ``feature_channels`` is the width of the segmenter's φ (LoRM)."""
    if isinstance(config, CrossEntropyConfig):
        return cross_entropy_objective(config)
    if isinstance(config, SymmetricCrossEntropyConfig):
        return sce_objective(config)
    if isinstance(config, CurriculumConfig):
        return curriculum_objective(config)
    if isinstance(config, NoiseAwareConfig):
        return NoiseAwareObjective(config)
    if isinstance(config, CdspConfig):
        return CdspObjective(config, feature_channels)
    if isinstance(config, MspnLossConfig):
        return MspnObjective(config, num_classes)
    raise ValueError(f"train_seg.loss: no objective for {config.name!r}")


def segmentation_maps(config: SegLossConfig) -> tuple[str, ...]:
    """The per-pixel maps the objective of ``config`` reads (what the data pipeline must load and crop)."""
    return {"cross_entropy": PixelLossObjective.maps, "sce": PixelLossObjective.maps,
            "curriculum": PixelLossObjective.maps, "nal": NoiseAwareObjective.maps, "cdsp": CdspObjective.maps,
            "mspn": MspnObjective.maps}[config.name]
