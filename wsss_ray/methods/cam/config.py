"""Config of the CAM baseline: the GAP head, the multi-label soft-margin loss, the image-level CAM generator."""

from __future__ import annotations

from typing import Literal

from wsss_ray.core.config_base import StrictModel
from wsss_ray.methods.base import CamThresholdSettings, MultiScaleSettings


class GapHeadConfig(StrictModel):
    """Global average pooling over CAM features, the CAM baseline (Zhou et al. 2016)."""

    name: Literal["gap"] = "gap"


class MultiLabelSoftMarginConfig(StrictModel):
    """The multi-label soft-margin loss every paper trains its classifier with."""

    name: Literal["multilabel_soft_margin"] = "multilabel_soft_margin"


class ImageCamGeneratorConfig(MultiScaleSettings, CamThresholdSettings):
    """Image-level CAM pseudo-masks: multi-scale + flip CAMs, background by threshold, DenseCRF."""

    name: Literal["image_cam"] = "image_cam"
