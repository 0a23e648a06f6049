"""CDSP's segmentation objective: partial CE on scribbles + label-smoothed CE on the pseudo-mask, LoRM, and the
distance entropy loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.methods.base import SegmentationObjective
from wsss_ray.methods.cdsp.config import CdspConfig
from wsss_ray.methods.cdsp.losses import LoRM, distance_entropy_loss, partial_cross_entropy, smoothed_cross_entropy

Terms = dict[str, torch.Tensor]


def lorm_foreground(label: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """LoRM's mask ``M`` (N, h, w) in {0, 1} at the feature map's ``size``, as the authors build it: the label map
    with 255 → 0, its *values* resized bilinearly (align_corners=True), ``M = [value > 0]``; so a feature cell
    touching any foreground pixel counts as foreground. On a copy: the authors' code writes 255 → 0 into the
    caller's pseudo-label in place, which then trains ignored pixels (crop padding included) as background in
    L_segc; we do not reproduce that side effect."""
    values = label.masked_fill(label == IGNORE_LABEL, 0).float()[:, None]
    small = F.interpolate(values, size=tuple(size), mode="bilinear", align_corners=True)[:, 0]
    return (small > 0).float()


class CdspObjective(SegmentationObjective):
    """CDSP: partial CE on scribbles + label-smoothed CE on the pseudo-mask, + LoRM, + distance entropy."""

    maps: ClassVar[tuple[str, ...]] = ("label", "scribble", "dist_scribble", "dist_boundary")

    @classmethod
    def feature_channels(cls, config: CdspConfig, build_model: Callable[[], nn.Module]) -> int:
        """The width of the segmenter's features LoRM projects (the backbone's layer 4, or φ with
        ``lorm_features="head"``); 0 without LoRM. Read from a throwaway model: the loop calls this right after
        ``build_model()`` and ``torch.manual_seed(seed)``, so the throwaway build draws its initial weights from
        the global torch RNG and moves it on before LoRM's projections are initialised (and before any later draw
        of the step). Kept as it was, and only with LoRM, so that every other objective's runs draw exactly what
        they drew before."""
        if not config.lorm:
            return 0
        throwaway = build_model()
        if config.lorm_features == "backbone":
            return int(throwaway.backbone.out_channels)
        return int(throwaway.classifier_weight().shape[1])

    def __init__(self, config: CdspConfig, num_classes: int, feature_channels: int) -> None:
        super().__init__()
        self.config = config
        # ``feature_channels`` = the width of LoRM's input: the backbone's (``lorm_features="backbone"``) or φ's.
        self.lorm = (LoRM(feature_channels, config.lorm_channels, config.lorm_mask, config.lorm_reduction)
                     if config.lorm else None)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        cfg = self.config
        out = model(batch["image"], with_features=True)
        logits, label = out["logits"].float(), batch["label"].long()
        partial = partial_cross_entropy(logits, batch["scribble"].long())
        smoothed = smoothed_cross_entropy(logits, label, cfg.label_smoothing)
        loss = partial + smoothed
        terms: Terms = {"partial_ce": partial.detach(), "smoothed_ce": smoothed.detach()}
        if self.lorm is not None:
            features = out["backbone" if cfg.lorm_features == "backbone" else "features"].float()
            lorm = self.lorm(features, lorm_foreground(label, features.shape[-2:]))
            loss = loss + cfg.lorm_weight * lorm
            terms["lorm"] = lorm.detach()
        if cfg.distance:
            de, de_terms = distance_entropy_loss(logits, batch["dist_scribble"].float() / 255.0,
                                                 batch["dist_boundary"].float() / 255.0)
            loss = loss + cfg.distance_weight * de
            terms.update({f"de_{k}": v for k, v in de_terms.items()})
        return loss, terms
