"""DeepLab-v3 for semantic segmentation, laid out like torchvision's ``deeplabv3_resnet50``.

``backbone`` + ``classifier`` (ASPP → 3x3 conv → 1x1 conv), upsampled bilinearly to the input size. ASPP
rates follow the output stride (6/12/18 at stride 16, doubled at stride 8), as in Chen et al. 2017.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.config import SegModelConfig
from wsss_ray.models.resnet import build_backbone


class ASPPConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels: int, rates: list[int], out_channels: int = 256) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, rates: list[int], channels: int) -> None:
        super().__init__(ASPP(in_channels, rates, channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, num_classes, 1))


class DeepLabV3(nn.Module):
    def __init__(self, config: SegModelConfig, num_classes: int) -> None:
        super().__init__()
        bb = config.backbone
        self.backbone = build_backbone(bb.name, bb.output_stride, bb.weights)
        rates = [6 * 16 // bb.output_stride * r for r in (1, 2, 3)] if bb.output_stride <= 16 else [3, 6, 9]
        self.classifier = DeepLabHead(self.backbone.out_channels, num_classes, rates, config.aspp_channels)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return list(self.backbone.parameters()), list(self.classifier.parameters())


SEG_MODELS: dict[str, type[nn.Module]] = {"deeplab_v3": DeepLabV3}


def build_segmentation_model(config: SegModelConfig, num_classes: int) -> nn.Module:
    return SEG_MODELS[config.name](config, num_classes)
