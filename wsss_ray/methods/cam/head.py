"""The CAM baseline's classifier head: global average pooling (Zhou et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.methods.base import ClassifierHead
from wsss_ray.methods.cam.config import GapHeadConfig


class GapHead(ClassifierHead):
    """GAP baseline (Zhou et al. 2016): a bias-free 1x1 classifier; CAM_c = ReLU(f · w_c)."""

    def __init__(self, in_channels: int, num_foreground: int, config: GapHeadConfig) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_foreground, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image-level logits (N, C): pooling before the linear classifier equals pooling the CAMs."""
        return self.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)

    def cams(self, features: torch.Tensor) -> torch.Tensor:
        """Un-normalised CAMs (N, C, h, w)."""
        return F.relu(self.classifier(features))
