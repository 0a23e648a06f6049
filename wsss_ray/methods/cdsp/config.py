"""Config of CDSP (Zhang et al. AAAI 2024): the scribble generator and the CDSP segmentation loss."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wsss_ray.core.config_base import Fraction, PositiveInt, StrictModel
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
    # d_s sources: foreground scribbles (the paper, the authors' code) or every stroke, background too (old).
    scribble_sources: Literal["foreground", "all"] = "foreground"
    # d_c's boundary: the contour of the binary foreground mask (the paper, the authors' code) or both sides of
    # every label change, 255 borders included (old).
    boundary: Literal["foreground_contour", "label_edges"] = "foreground_contour"
    # d_c is taken on the CAM pseudo-label before the scribbles are pasted (the authors' code reads the CAM
    # pseudo-label folder) or on the final, scribble-pasted mask (old).
    boundary_source: Literal["cam_pseudo", "final"] = "cam_pseudo"
    # Scaled distances are floored (the paper's ⌊·⌋, the authors' uint8 cast) or rounded (old).
    quantise: Literal["floor", "round"] = "floor"


class CdspConfig(StrictModel):
    """CDSP: partial CE on scribbles + label-smoothed CE on the pseudo-label (basic loss), LoRM on the backbone's
    last feature map and the distance entropy loss from the ``scribble`` generator's distance maps."""

    name: Literal["cdsp"] = "cdsp"
    label_smoothing: Fraction = 0.1
    lorm: bool = True
    lorm_weight: Annotated[float, Field(ge=0.0)] = 1.0
    # Which axis of LoRM's attention the foreground mask multiplies: rows (queries; the authors' code, Eq. 11's
    # "background features in each row are suppressed") or columns (sources; our old reading).
    lorm_mask: Literal["rows", "columns"] = "rows"
    # MSE over every position and channel divided by the number of non-zero squared errors (the authors'
    # ``mse_loss``; the paper writes MSE(F, F̂) over the map), or over foreground positions only (old reading).
    lorm_reduction: Literal["all_nonzero", "foreground"] = "all_nonzero"
    # LoRM's F: the backbone's last map (the paper; ResNet layer 4, 2048-d) or φ, the head's features (old).
    lorm_features: Literal["backbone", "head"] = "backbone"
    # Width of LoRM's query/key projections; None = the feature width (the authors' 2048 → 2048). Old: 64.
    lorm_channels: PositiveInt | None = None
    distance: bool = True
    distance_weight: Annotated[float, Field(ge=0.0)] = 1.0
