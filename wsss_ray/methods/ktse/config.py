"""Config of KTSE (Chen et al. ECCV 2024): its classifier head and its objective."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from wsss_ray.core.config import Fraction, PositiveInt, StrictModel


class KtseHeadConfig(StrictModel):
    """KTSE's classifier head: C+1-channel CAM features (background included) pooled by a gated pyramid pooling
    (GPP) layer (Yoon et al. ECCV 2022), the "strong baseline" of KTSE's Table 6."""

    name: Literal["ktse"] = "ktse"
    # Pyramid levels of GPP: the feature map is pooled over 1x1, 2x2, ... grids and the levels are gated.
    pyramid: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4]  # noqa: RUF012 - a pydantic field


class KtseLossConfig(StrictModel):
    """KTSE's objective: L_cls + L_kt (SIE) + L_ce + λ_inter·L_inter (SSR) + L_global + L_local (MGA).

    The three switches give the rows of KTSE's ablation (Table 6): base (GPP + L_cls), +SIE, +SIE+SSR, all.
    """

    name: Literal["ktse"] = "ktse"
    sie: bool = True
    ssr: bool = True
    mga: bool = True
    # SSR: anchor-CAM pseudo-label thresholds, foreground weight of its CE, the foreground threshold of the
    # inter-class loss's mask M^f (max CAM ≥ β_o) and that loss's weight.
    beta_h: Fraction = 0.3
    beta_l: Fraction = 0.15
    omega_fg: Annotated[float, Field(ge=0.0)] = 0.0125
    beta_o: Fraction = 0.2
    lambda_inter: Annotated[float, Field(ge=0.0)] = 0.005
    # MGA: the most discriminative region (normalised CAM above this) is erased for the masked branch.
    erase_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.6

    @model_validator(mode="after")
    def _thresholds(self) -> KtseLossConfig:
        if self.beta_l > self.beta_h:
            raise ValueError(f"beta_l ({self.beta_l}) must not exceed beta_h ({self.beta_h})")
        return self
