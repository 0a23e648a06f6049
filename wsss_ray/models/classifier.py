"""CAM classifiers: a backbone plus a pooling head, trained from image-level labels.

The head is a named component (``train_cls.head.name``, registered in ``wsss_ray.methods.registry``): it turns the
backbone's feature map into image-level logits for training and into class activation maps (CAMs) for
pseudo-labelling. ``wsss_ray.methods.registry.build_classifier`` builds the pair from a config.
"""

from __future__ import annotations

import torch
from torch import nn

from wsss_ray.models.resnet import ResNet


class CamClassifier(nn.Module):
    """Backbone + head over the ``num_foreground`` foreground classes (background has no logit)."""

    def __init__(self, backbone: ResNet, head: nn.Module, num_foreground: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_foreground = num_foreground

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        return self.head.cams(self.backbone(images))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head) parameters: heads train with a larger learning rate (IRN, DeepLab)."""
        return list(self.backbone.parameters()), list(self.head.parameters())
