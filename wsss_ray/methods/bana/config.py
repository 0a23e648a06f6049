"""Config of BANA (Oh, Kim, Ham, CVPR 2021): the BAP head and loss, the box generator, the noise-aware loss."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wsss_ray.core.config import PositiveFloat, PositiveInt, StrictModel
from wsss_ray.methods.base import MultiScaleSettings


class BapHeadConfig(StrictModel):
    """BANA's background-aware pooling: background queries from an N×N grid outside the boxes, attention A,
    box features pooled with (1 − A), a cosine (L+1)-way classifier over boxes and background."""

    name: Literal["bap"] = "bap"
    # N of the N×N grid of background queries while training (BANA: 4; generation uses the generator's grid).
    grid: PositiveInt = 4
    # Scale of the cosine classifier's logits: a cosine in [-1, 1] is too flat for a softmax. BANA does not
    # state it here; 20 is the usual value of cosine classifiers.
    scale: PositiveFloat = 20.0


class BapLossConfig(StrictModel):
    """BANA's classifier loss: (L+1)-way cross-entropy over box features and background queries."""

    name: Literal["bap"] = "bap"


class BoxGeneratorConfig(MultiScaleSettings):
    """BANA box pseudo-masks: CAMs inside the boxes, background attention (BAP) outside, DenseCRF → ``Y_crf``;
    feature prototypes of ``Y_crf`` retrieve a second label map ``Y_ret``. The CAM scales and flip give u_c (the
    papers' multi-scale + flip inference; BANA does not say, IRN's set)."""

    name: Literal["box"] = "box"
    # Grid size N of the background queries: BANA trains with N = 4 and generates pseudo labels with N = 1.
    grid: PositiveInt = 1
    # Background attention at or above this is confident background (u_0 = 1); BANA: 0.99 for generation.
    bg_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.99


class NoiseAwareConfig(StrictModel):
    """BANA's NAL: CE where Y_crf == Y_ret, σ-weighted CE elsewhere; L = L_ce + λ·L_wce (γ = 7, λ = 0.1).
    Needs the ``box`` generator's outputs (Y_crf = ``pseudo``, Y_ret = ``retrieved``)."""

    name: Literal["nal"] = "nal"
    gamma: Annotated[float, Field(ge=0.0)] = 7.0
    lambda_wce: Annotated[float, Field(ge=0.0)] = 0.1
