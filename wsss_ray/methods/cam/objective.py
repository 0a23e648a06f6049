"""The CAM baseline's classifier objective."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.methods.base import ClassifierObjective
from wsss_ray.methods.cam.config import MultiLabelSoftMarginConfig

Terms = dict[str, torch.Tensor]


def multilabel_soft_margin(config: MultiLabelSoftMarginConfig) -> Any:
    """Image-level loss of every CAM classifier: per-class sigmoid BCE averaged over classes."""
    return F.multilabel_soft_margin_loss


class MultiLabelObjective(ClassifierObjective):
    """Multi-label soft-margin loss on the head's image logits (the GAP baseline; any head)."""

    maps: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MultiLabelSoftMarginConfig | None = None, head_config: object = None) -> None:
        super().__init__()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        return F.multilabel_soft_margin_loss(model(batch["image"]).float(), batch["target"]), {}
