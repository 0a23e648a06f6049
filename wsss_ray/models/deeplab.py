"""DeepLab-v2, -v3 and -v3+ segmentation models on a dilated ResNet, with one interface for all three.

Interface (every model in ``SEG_MODELS``; ``build_segmentation_model(config, num_classes)`` picks one by
``config.name``):

- ``model(images) -> logits``: (N, C, H, W) class scores upsampled bilinearly (``align_corners=False``) to the
  input size, whatever that size is (odd sizes included). Evaluation and the plain training loop use this.
- ``model(images, with_features=True) -> {"logits": ..., "features": φ, "backbone": layer 4}``: the same logits
  plus φ, the (N, D, h, w) input of the final 1x1 classifier at its own stride (the output stride for v2/v3, 4
  for v3+), which BANA's noise-aware loss reads (``D_c = 1 + cos(φ, W_c)``), and the backbone's last map (N,
  ``backbone.out_channels``, h, w) at the output stride, CDSP's LoRM input ``F``. It goes through ``forward``
  on purpose: DistributedDataParallel only synchronises gradients of what ``forward`` computed.
- ``classifier_weight() -> W``: (C, D) weight of the final 1x1 conv (a view of the parameter, so a loss using it
  reaches W in the same backward pass; ``.detach()`` it to treat W as a constant). Before upsampling,
  ``logits = W φ + b`` per pixel exactly in eval mode (with ``classifier: cosine``, ``τ·cos(φ, W_c)``); in
  training mode v2 applies dropout between φ and W (see ``DeepLabV2``).
- ``parameter_groups() -> (backbone parameters, head parameters)``: every parameter in exactly one group (the
  head trains with ``head_lr_multiplier``).

State-dict layout: ``backbone.*`` (torchvision ResNet names) and ``classifier.*`` (the head). DeepLab-v3 keeps
torchvision's ``deeplabv3_resnet50`` names (``classifier.0.convs.0.0.weight`` … ``classifier.4.weight``) so its
older checkpoints still load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core.config_base import SegModelConfig
from wsss_ray.models.resnet import ResNet, build_backbone


def scale_rates(rates: Sequence[int], reference_stride: int, output_stride: int) -> list[int]:
    """Atrous rates ``r · reference_stride / output_stride`` (floored, at least 1).

    A rate is a field of view measured in feature-map pixels, so it scales inversely with the output stride:
    v2's 6/12/18/24 (defined at stride 8) become 3/6/9/12 at stride 16; v3's 6/12/18 (stride 16) become
    12/24/36 at stride 8. At stride 32, which neither paper uses, our reading floors the quotient (v2: 1/3/4/6).
    """
    return [max(1, r * reference_stride // output_stride) for r in rates]


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
    """DeepLab-v3's ASPP: a 1x1 branch, one 3x3 branch per atrous rate and image pooling, concatenated and
    projected to ``out_channels`` (1x1 conv, BN, ReLU, dropout)."""

    def __init__(self, in_channels: int, rates: list[int], out_channels: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class SegmentationModel(nn.Module):
    """Backbone + head with the interface of the module docstring. Subclasses build ``backbone`` and
    ``classifier`` (the head) and implement ``head_features`` (φ) and ``final_conv`` (the 1x1 classifier)."""

    backbone: ResNet
    classifier: nn.Module
    num_classes: int
    # None: the final conv is linear (W φ + b); a number τ: a cosine classifier τ·cos(φ, W_c) (see use_cosine).
    cosine_scale: float | None = None

    def head_features(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """φ (N, D, h, w) from the backbone's ``forward_features`` maps."""
        raise NotImplementedError

    @property
    def final_conv(self) -> nn.Conv2d:
        """The final 1x1 classifier conv (weight W of shape (C, D, 1, 1), bias b of shape (C,))."""
        raise NotImplementedError

    def classify(self, phi: torch.Tensor) -> torch.Tensor:
        """Class scores at φ's stride (v2 overrides it to add dropout before the classifier)."""
        return self.apply_classifier(phi)

    def apply_classifier(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` per pixel, or with the cosine head ``τ·⟨x/‖x‖, W_c/‖W_c‖⟩`` (norms floored at 1e-12)."""
        if self.cosine_scale is None:
            return self.final_conv(x)
        weight = F.normalize(self.final_conv.weight, dim=1, eps=1e-12)
        return self.cosine_scale * F.conv2d(F.normalize(x, dim=1, eps=1e-12), weight)

    def use_cosine(self, scale: float) -> None:
        """Turn the final 1x1 conv into BANA's cosine classifier (footnote 4; stage3_vgg.py, TEMP 20): a bias-free
        conv with W ~ N(0, 0.01²), scores ``scale · cos(φ, W_c)``. ``classifier_weight`` stays that W, so NAL's
        σ reads the same weights the logits use."""
        old = self.final_conv
        conv = nn.Conv2d(old.in_channels, old.out_channels, 1, bias=False)
        nn.init.normal_(conv.weight, 0.0, 0.01)
        name = next(n for n, m in self.named_modules() if m is old)
        parent, _, attr = name.rpartition(".")
        setattr(self.get_submodule(parent), attr, conv)
        self.cosine_scale = float(scale)

    @overload
    def forward(self, images: torch.Tensor, with_features: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(self, images: torch.Tensor, with_features: Literal[True]) -> dict[str, torch.Tensor]: ...

    def forward(self, images: torch.Tensor, with_features: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (N, C, H, W) at the input size; with ``with_features`` a dict with ``logits``, φ (``features``,
        N × D × h × w at the head's own stride) and the backbone's layer-4 map (``backbone``)."""
        maps = self.backbone.forward_features(images)
        phi = self.head_features(maps)
        logits = F.interpolate(self.classify(phi), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if with_features:
            return {"logits": logits, "features": phi, "backbone": maps["out"]}
        return logits

    def classifier_weight(self) -> torch.Tensor:
        """W (C, D): the final 1x1 conv's weight, row c = class c's weight vector W_c (a view, not a copy)."""
        return self.final_conv.weight.flatten(1)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head) parameters; every parameter of the model is in exactly one of the two."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]


class DeepLabV2Head(nn.Module):
    """Our DeepLab-v2 ASPP: Σ_r conv3x3_r(x) over the rates, BN, ReLU → φ; dropout and a 1x1 conv give the
    class scores."""

    def __init__(self, in_channels: int, num_classes: int, rates: list[int], channels: int,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, channels, 3, padding=rate, dilation=rate, bias=False) for rate in rates)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.final = nn.Conv2d(channels, num_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ = ReLU(BN(Σ_r conv3x3_r(x)))."""
        total = self.branches[0](x)
        for branch in self.branches[1:]:
            total = total + branch(x)
        return self.relu(self.bn(total))


class DeepLabV2(SegmentationModel):
    """DeepLab-v2 with ASPP (Chen et al., TPAMI 2017), adapted so that a feature map φ enters one classifier.

    The paper's ASPP-L puts four branches with atrous rates 6/12/18/24 on the stride-8 feature map and sums
    their per-branch class scores. Here the four dilated 3x3 convs output ``aspp_channels`` features each, are
    summed, then BN, ReLU, dropout and one 1x1 classifier. A sum of linear branches followed by one linear map
    is the same function class as summed per-branch linear classifiers; the extra BN + ReLU gives the head a
    feature map φ and classifier weights W, which BANA's NAL and CDSP's LoRM need. Rates 6/12/18/24 are for
    output stride 8 and are halved at stride 16 (3/6/9/12), keeping the same field of view in pixels.

    Our reading where the paper is silent or its architecture does not apply:
    - BN after the sum (the paper's head has none): the branches are bias-free convs, normalised together.
      Every other head here and the backbone use BN (and the trainer's sync_bn covers it), and it keeps the
      sum of four branches at a trainable scale when the head starts from scratch at lr 1e-3.
    - Dropout 0.5, the rate of DeepLab-v2's VGG ASPP-L branches (fc6/fc7), between φ and the classifier.
      ``features`` is φ before dropout: dropout is a training-time perturbation of the classifier's input, not
      part of the representation whose cosine to W_c NAL measures. So in training mode the logits are
      ``W · dropout(φ) + b``; in eval mode exactly ``W φ + b``.
    """

    classifier: DeepLabV2Head

    def __init__(self, config: SegModelConfig, num_classes: int) -> None:
        super().__init__()
        bb = config.backbone
        self.backbone = build_backbone(bb.name, bb.output_stride, bb.weights)
        rates = scale_rates((6, 12, 18, 24), 8, bb.output_stride)
        self.classifier = DeepLabV2Head(self.backbone.out_channels, num_classes, rates, config.aspp_channels)
        self.num_classes = num_classes

    def head_features(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier.features(features["out"])

    @property
    def final_conv(self) -> nn.Conv2d:
        return self.classifier.final

    def classify(self, phi: torch.Tensor) -> torch.Tensor:
        """``W · dropout(φ) + b``, or the cosine head on dropout(φ) (dropout is the identity in eval mode)."""
        return self.apply_classifier(self.classifier.dropout(phi))


class DeepLabHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, rates: list[int], channels: int) -> None:
        super().__init__(ASPP(in_channels, rates, channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, num_classes, 1))


class DeepLabV3(SegmentationModel):
    """DeepLab-v3 (Chen et al. 2017, "Rethinking atrous convolution"), laid out like torchvision's
    ``deeplabv3_resnet50``: ``classifier`` = ASPP → 3x3 conv, BN, ReLU (→ φ) → 1x1 conv. ASPP rates 6/12/18 at
    output stride 16, doubled at stride 8."""

    classifier: DeepLabHead

    def __init__(self, config: SegModelConfig, num_classes: int) -> None:
        super().__init__()
        bb = config.backbone
        self.backbone = build_backbone(bb.name, bb.output_stride, bb.weights)
        rates = scale_rates((6, 12, 18), 16, bb.output_stride)
        self.classifier = DeepLabHead(self.backbone.out_channels, num_classes, rates, config.aspp_channels)
        self.num_classes = num_classes

    def head_features(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features["out"]
        for module in list(self.classifier)[:-1]:
            x = module(x)
        return x

    @property
    def final_conv(self) -> nn.Conv2d:
        final = self.classifier[-1]
        assert isinstance(final, nn.Conv2d)
        return final


class DeepLabV3PlusHead(nn.Module):
    """v3's ASPP (encoder) + the v3+ decoder: ``reduce`` (1x1 conv to 48, BN, ReLU on the low-level map),
    ``fuse`` (two 3x3 convs, BN, ReLU) and ``final`` (the 1x1 classifier)."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, rates: list[int],
                 channels: int, low_reduced: int = 48) -> None:
        super().__init__()
        # Dropout 0.1 after the ASPP projection as in the official v3+ code (keep_prob 0.9), rather than v3's
        # 0.5: the decoder convs still follow, and the low-level path carries no dropout.
        self.aspp = ASPP(in_channels, rates, channels, dropout=0.1)
        self.reduce = nn.Sequential(nn.Conv2d(low_channels, low_reduced, 1, bias=False),
                                    nn.BatchNorm2d(low_reduced), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + low_reduced, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.final = nn.Conv2d(channels, num_classes, 1)

    def features(self, out: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """φ = fuse([upsample(ASPP(out)) to low's size, reduce(low)]) at stride 4."""
        encoded = F.interpolate(self.aspp(out), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([encoded, self.reduce(low)], dim=1))


class DeepLabV3Plus(SegmentationModel):
    """DeepLab-v3+ (Chen et al., ECCV 2018): v3's ASPP as encoder, then a decoder that concatenates the ASPP
    output, upsampled bilinearly to stride 4, with ``layer1``'s features reduced by a 1x1 conv to 48 channels,
    refines them with two 3x3 convs (``aspp_channels``, BN, ReLU) into φ, and classifies with a 1x1 conv; the
    stride-4 logits are upsampled to the input size. ASPP rates as v3 (6/12/18 at stride 16, doubled at 8).

    Our reading: the paper's ResNet decoder uses plain (not depthwise-separable) 3x3 convs; upsampling to the
    low-level map's exact size (rather than by a factor 4) keeps odd input sizes aligned.
    """

    classifier: DeepLabV3PlusHead

    def __init__(self, config: SegModelConfig, num_classes: int) -> None:
        super().__init__()
        bb = config.backbone
        self.backbone = build_backbone(bb.name, bb.output_stride, bb.weights)
        rates = scale_rates((6, 12, 18), 16, bb.output_stride)
        self.classifier = DeepLabV3PlusHead(self.backbone.out_channels, self.backbone.low_channels, num_classes,
                                            rates, config.aspp_channels)
        self.num_classes = num_classes

    def head_features(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier.features(features["out"], features["low"])

    @property
    def final_conv(self) -> nn.Conv2d:
        return self.classifier.final


SEG_MODELS: dict[str, type[SegmentationModel]] = {
    "deeplab_v2": DeepLabV2,
    "deeplab_v3": DeepLabV3,
    "deeplab_v3plus": DeepLabV3Plus,
}


def build_segmentation_model(config: SegModelConfig, num_classes: int) -> SegmentationModel:
    """The ``config.name`` model with ``num_classes`` outputs (background included). A "small" model is just a
    ``resnet_tiny`` backbone with a small ``aspp_channels``. ``config.classifier == "cosine"`` swaps the final
    conv for the cosine classifier (after the head is built, so a conv model's initial weights are unchanged)."""
    model = SEG_MODELS[config.name](config, num_classes)
    if config.classifier == "cosine":
        model.use_cosine(config.cosine_scale)
    return model
