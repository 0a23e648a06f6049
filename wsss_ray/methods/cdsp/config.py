"""Config of CDSP (Zhang et al. AAAI 2024): the scribble generator and the CDSP segmentation loss."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wsss_ray.core.config import Fraction, PositiveInt, StrictModel
from wsss_ray.methods.base import CamThresholdSettings, MultiScaleSettings


class ScribbleGeneratorConfig(MultiScaleSettings, CamThresholdSettings):
    """CDSP scribble pseudo-masks: CRF-refined CAM mask of the scribbles' classes, scribble pixels on top, plus
    the distance maps of its distance entropy loss (to the scribbles and to the pseudo-label boundaries). The CAM
    settings are ``image_cam``'s (CDSP thresholds CAMs; IRN's scales and bg score); scribble pixels are never
    ignored by ``confidence``."""

    name: Literal["scribble"] = "scribble"
    # The paper writes λs = e², λc = e⁷: the distance is scaled by sqrt(e^λ) = e^(λ/2) with λs = 2, λc = 7
    # (ResNet-101 + v3+; its ablation grid-searched λs = 1, λc = 6).
    lambda_s: float = 2.0
    lambda_c: float = 7.0


class CdspConfig(StrictModel):
    """CDSP: partial CE on scribbles + label-smoothed CE on the pseudo-label (basic loss), LoRM on the
    stride-8/16 features and the distance entropy loss from the ``scribble`` generator's distance maps."""

    name: Literal["cdsp"] = "cdsp"
    label_smoothing: Fraction = 0.1
    lorm: bool = True
    lorm_weight: Annotated[float, Field(ge=0.0)] = 1.0
    # Channels of LoRM's query/key projections (1x1 convs); the paper does not say, a quarter of 256 is usual.
    lorm_channels: PositiveInt = 64
    distance: bool = True
    distance_weight: Annotated[float, Field(ge=0.0)] = 1.0
