"""CAM classifiers: a backbone plus a pooling head, trained from image-level labels.

A head is a named component (``train_cls.head.name``): it turns the backbone's feature map into image-level
logits for training and into class activation maps (CAMs) for pseudo-labelling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.config import ClassifierTrainConfig, GapHeadConfig
from wsss_ray.models.bap import BapHead
from wsss_ray.models.ktse import KtseHead
from wsss_ray.models.resnet import build_backbone


class GapHead(nn.Module):
    """GAP baseline (Zhou et al. 2016): a bias-free 1x1 classifier; CAM_c = ReLU(f · w_c)."""

    def __init__(self, in_channels: int, num_classes: int, config: GapHeadConfig) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image-level logits (N, C): pooling before the linear classifier equals pooling the CAMs."""
        return self.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)

    def cams(self, features: torch.Tensor) -> torch.Tensor:
        """Un-normalised CAMs (N, C, h, w)."""
        return F.relu(self.classifier(features))


# KTSE's and BANA's heads live in their own modules, next to their maths.
HEADS: dict[str, type[nn.Module]] = {"gap": GapHead, "ktse": KtseHead, "bap": BapHead}


class CamClassifier(nn.Module):
    """Backbone + head over the ``num_classes`` foreground classes (background has no logit)."""

    def __init__(self, config: ClassifierTrainConfig, num_classes: int) -> None:
        super().__init__()
        bb = config.backbone
        self.backbone = build_backbone(bb.name, bb.output_stride, bb.weights)
        self.head = HEADS[config.head.name](self.backbone.out_channels, num_classes, config.head)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        return self.head.cams(self.backbone(images))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head) parameters: heads train with a larger learning rate (IRN, DeepLab)."""
        return list(self.backbone.parameters()), list(self.head.parameters())
