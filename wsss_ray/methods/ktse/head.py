"""KTSE's classifier head (Chen et al. ECCV 2024, Sec. 3.1): C+1-channel CAM features and gated pyramid pooling.

The backbone's feature map goes through a bias-free 1x1 convolution to the C+1 class-aware CAM features F
(channel 0 = background, channel c = foreground class c), so localisation maps come out of the forward pass
and KTSE's losses can compare them between branches. Image logits q^c come from the Gated Pyramid Pooling
(GPP) layer of AEFT (Yoon et al. ECCV 2022, Sec. 3.3), KTSE's "strong baseline" (Table 6, 54.2 mIoU):

1. pyramid: P_s = upsample(AvgPool_{s×s}(F)) back to F's h×w for every level s (coarse bins carry global
   context, fine bins local detail);
2. gating: levels are merged in the configured order (AEFT: coarse → fine) by a sign-preserving gated fusion
   g(x, y) whose positive and negative parts get their own sigmoid attention from a 3x3 convolution;
3. pooling: q = GAP(ReLU(F)·ReLU(G)) − GAP(ReLU(−F)·ReLU(−G)), G the fused pyramid — the pyramid weights
   each pixel's contribution of the CAM to the image decision, separately for evidence for and against a class.

The GPP is AEFT's (its paper and public code) run on the C foreground channels, as the authors' code does
(``gpp_channels: foreground``; ``all`` is our former reading: all C+1 channels, gates seeing the background
one, the foreground logits then channels 1..C of q). The pyramid levels come from the config; the default 2, 4, 8,
16 is the KTSE code's ``cam2logit`` (gates applied 2→4, then →8, then →16), with which the head computes exactly
what that function does. A single level means no gate (G = P_s). A level at least the map's size pools nothing
new: adaptive pooling then repeats each cell, and the bilinear resize back returns F itself when the level is a
multiple of the map's size (a 2x2 map: levels 4, 8, 16 are F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.methods.base import ClassifierHead
from wsss_ray.methods.ktse.config import KtseHeadConfig


def gated_fusion(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """AEFT's sign-preserving fusion of two maps (N, K, h, w) given their attentions (N, 2, h, w) in [0, 1].

    g = (ReLU(x)·α₀ + ReLU(y)·α₁)/2 − (ReLU(−x)·β₀ + ReLU(−y)·β₁)/2: positive parts (evidence for a class)
    and negative parts (evidence against it) are mixed separately, so the fusion never flips a sign.
    """
    positive = (F.relu(x) * alpha[:, 0:1] + F.relu(y) * alpha[:, 1:2]) / 2
    negative = (F.relu(-x) * beta[:, 0:1] + F.relu(-y) * beta[:, 1:2]) / 2
    return positive - negative


def gpp_pool(cam_features: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
    """Image logits (N, K) from CAM features F and the fused pyramid G, both (N, K, h, w).

    q = GAP(ReLU(F)·ReLU(G)) − GAP(ReLU(−F)·ReLU(−G)) (AEFT Sec. 3.3): G acts as a pixel-level weight of the
    CAM's positive and negative evidence.
    """
    positive = (F.relu(cam_features) * F.relu(gated)).mean((2, 3))
    negative = (F.relu(-cam_features) * F.relu(-gated)).mean((2, 3))
    return positive - negative


class GatedFusion(nn.Module):
    """One gate g(x, y) of GPP: attentions α, β = σ(conv3x3([ReLU(±x), ReLU(±y)])) then :func:`gated_fusion`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Two outputs per sign: one weight for the running (coarser) map x, one for the new level y.
        self.positive = nn.Conv2d(2 * channels, 2, 3, padding=1, bias=False)
        self.negative = nn.Conv2d(2 * channels, 2, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.positive(torch.cat([F.relu(x), F.relu(y)], dim=1)))
        beta = torch.sigmoid(self.negative(torch.cat([F.relu(-x), F.relu(-y)], dim=1)))
        return gated_fusion(x, y, alpha, beta)


class KtseHead(ClassifierHead):
    """Bias-free 1x1 conv to C+1 CAM features F (channel 0 = background) + GPP pooling to C foreground logits."""

    def __init__(self, in_channels: int, num_foreground: int, config: KtseHeadConfig) -> None:
        super().__init__()
        self.num_foreground = num_foreground
        self.pyramid = list(config.pyramid)
        # Channels of F that GPP sees: from 1 (the foreground ones) or from 0 (all, background included).
        self.first_pooled = 1 if config.gpp_channels == "foreground" else 0
        self.classifier = nn.Conv2d(in_channels, num_foreground + 1, 1, bias=False)
        self.gates = nn.ModuleList(GatedFusion(num_foreground + 1 - self.first_pooled) for _ in self.pyramid[1:])

    def cam_features(self, features: torch.Tensor) -> torch.Tensor:
        """CAM features F (N, C+1, h, w): the un-rectified class maps KTSE's losses compare."""
        return self.classifier(features)

    def pyramid_maps(self, cam_features: torch.Tensor) -> list[torch.Tensor]:
        """P_s = bilinear upsampling of the s×s average-pooled F back to (h, w), one per pyramid level."""
        size = cam_features.shape[-2:]
        return [F.interpolate(F.adaptive_avg_pool2d(cam_features, s), size=size, mode="bilinear",
                              align_corners=False) for s in self.pyramid]

    def pool(self, cam_features: torch.Tensor) -> torch.Tensor:
        """Foreground image logits (N, C) of given CAM features: GPP over the pyramid, background dropped.

        Lets a training objective reuse the F it already has instead of running the head twice.
        """
        pooled = cam_features[:, self.first_pooled:]
        levels = self.pyramid_maps(pooled)
        gated = levels[0]
        for gate, level in zip(self.gates, levels[1:], strict=True):
            gated = gate(gated, level)
        return gpp_pool(pooled, gated)[:, 1 - self.first_pooled:]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Foreground image logits (N, C) for the multi-label soft margin loss."""
        return self.pool(self.cam_features(features))

    def cams(self, features: torch.Tensor) -> torch.Tensor:
        """Un-normalised CAMs (N, C, h, w) = ReLU of the foreground channels of F (GapHead.cams' contract)."""
        return F.relu(self.cam_features(features)[:, 1:])

    def class_weights(self) -> torch.Tensor:
        """The 1x1 classifier's rows ``(C+1, D)``, row 0 = background."""
        return self.classifier.weight.detach().flatten(1)
