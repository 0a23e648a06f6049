"""Losses as named components, chosen by ``<stage>.loss.name``.

Each entry takes its config section and returns a callable ``(logits, target) -> scalar``. Later methods
(SCE, curriculum, NAL, CDSP, MSPN) add entries here with their own config models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss_ray.config import CrossEntropyConfig, MultiLabelSoftMarginConfig
from wsss_ray.data.classes import IGNORE_LABEL

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def multilabel_soft_margin(config: MultiLabelSoftMarginConfig) -> Loss:
    """Image-level loss of every CAM classifier: per-class sigmoid BCE averaged over classes."""
    return F.multilabel_soft_margin_loss


def cross_entropy(config: CrossEntropyConfig) -> Loss:
    """Pixel-wise CE over labelled pixels (255 ignored), optionally label-smoothed."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != IGNORE_LABEL).any():
            # Every pixel ignored: F.cross_entropy would return NaN; a zero keeps DDP's gradients in step.
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_LABEL,
                               label_smoothing=config.label_smoothing)

    return loss


CLASSIFIER_LOSSES: dict[str, Callable[..., Loss]] = {"multilabel_soft_margin": multilabel_soft_margin}
SEGMENTATION_LOSSES: dict[str, Callable[..., Loss]] = {"cross_entropy": cross_entropy}
