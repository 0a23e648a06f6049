"""Config of KTSE (Chen et al. ECCV 2024): its classifier head and its objective."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from wsss_ray.core.config_base import Fraction, ParConfig, PositiveInt, StrictModel

NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class KtseHeadConfig(StrictModel):
    """KTSE's classifier head: C+1-channel CAM features (background included) pooled by a gated pyramid pooling
    (GPP) layer (Yoon et al. ECCV 2022), the "strong baseline" of KTSE's Table 6."""

    name: Literal["ktse"] = "ktse"
    # Pyramid levels of GPP: the feature map is average-pooled to s×s grids, upsampled back and the levels gated
    # in order. Authors' cam2logit: 2, 4, 8, 16 (AEFT's GPP too). A level s at least the map's size pools nothing
    # new (on a 2x2 map, levels 4, 8 and 16 give F itself back): the gates then mix F with coarser levels only.
    # [1, 2, 4] is our earlier reading (chosen for stride-16 maps; no measurement behind it).
    pyramid: Annotated[list[PositiveInt], Field(min_length=1)] = [2, 4, 8, 16]  # noqa: RUF012 - a pydantic field
    # The channels GPP pools and gates: the C foreground ones (authors: ``cam2logit(cam_seg[:, 1:])``, so the
    # background channel learns from SSR's CE alone), or all C+1 (our former reading; the gates then see the
    # background channel and L_cls reaches it through them).
    gpp_channels: Literal["foreground", "all"] = "foreground"

    # A stage key leaves out an option added later while it holds the value that reproduces the earlier models
    # (``core.config.key_dump``): those trained before it keep their keys.
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"gpp_channels": "all"}


class KtseLossConfig(StrictModel):
    """KTSE's objective: L_cls + L_kt (SIE) + L_ce + λ_inter·L_inter (SSR) + L_global + L_local (MGA).

    The three switches give the rows of KTSE's ablation (Table 6): base (GPP + L_cls), +SIE, +SIE+SSR, all.
    Defaults are the paper's and, where it is silent, the authors' code (chentao2016/KTSE); every other value of
    a ``Literal``/``bool`` option below is our earlier reading, kept for comparison (docs/methods.md).
    """

    name: Literal["ktse"] = "ktse"
    sie: bool = True
    ssr: bool = True
    mga: bool = True
    # Epochs 0 .. warmup_epochs-1 train L_cls alone (authors' --T 10 of --max_epochs 40; the paper is silent).
    # An epoch count, not a fraction: scale it with train_cls.epochs yourself (KTSE: a quarter of the run).
    warmup_epochs: Annotated[int, Field(ge=0)] = 10
    # SSR: anchor-CAM pseudo-label thresholds (paper: β_l 0.15; the authors' code uses 0.1), foreground weight of
    # its CE, the threshold of the inter-class loss's mask M^f (max CAM > β_o) and that loss's weight.
    beta_h: Fraction = 0.3
    beta_l: Fraction = 0.15
    # The anchor CAM Ŷ is thresholded on: "max" = Eq. 1, ReLU(F)/max(F) (paper; the authors' Ŷ divides by the max
    # as well); "min_max" = (x − min)/(max − min), what the authors use for M^f and MGA's mask (our former
    # reading for Ŷ too: it stretches a map that is positive everywhere, so fewer pixels pass β_h).
    label_norm: Literal["max", "min_max"] = "max"
    # Where Ŷ's CAM is normalised: "feature" = at the feature map's resolution, then upsampled to the crop
    # (authors' refine_cams_with_bkg_v2); "input" = upsampled first, then normalised (our earlier reading).
    label_norm_at: Literal["feature", "input"] = "feature"
    # Ŷ refined by PAR (Sec. 3.3 "with the pixel-adaptive refinement module"; the code's refine_cams_with_bkg_v2:
    # PAR on softmax([β, A]) at half resolution, maths.par) or used as thresholded ("none", our earlier reading).
    ssr_refine: Literal["par", "none"] = "par"
    par: ParConfig = ParConfig()
    omega_fg: NonNegativeFloat = 0.0125
    beta_o: Fraction = 0.2
    lambda_inter: NonNegativeFloat = 0.005
    # ω_fg on the foreground CE of single-tag images, a separate mean from the background CE; multi-tag images
    # get no foreground CE (authors). "discount_complex": ω_fg on multi-tag images' foreground, one mean.
    fg_weighting: Literal["simple_only", "discount_complex"] = "simple_only"
    # Where SSR works: "input" = ReLU'd CAM features upsampled to the crop, Ŷ and M^f from the upsampled CAM
    # (authors); "feature" = raw features at feature-map resolution.
    ce_resolution: Literal["input", "feature"] = "input"
    # L_inter: V^max detached, on ReLU'd features, over all foreground channels (authors); False/False/"present"
    # = the loss on raw present-class features with both terms trained, whose minimum is unbounded.
    inter_detach_max: bool = True
    inter_on_relu: bool = True
    inter_channels: Literal["all", "present"] = "all"
    # SIE: the first sie_fraction of the batch (authors: 4 of 8) is paired with its next image, stacked along
    # the height (authors) or side by side ("width"); both halves of the synthetic image are supervised, each
    # by its own image (False: only the anchor half).
    sie_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    sie_concat: Literal["height", "width"] = "height"
    sie_both_halves: bool = True
    # L_kt, L_global, L_local: means over all C foreground channels with absent classes zeroed (authors) or
    # over the present classes only ("present"); the margin inside L_kt's and L_local's ReLU (authors' code
    # 0.05, absent from the paper's Eq. 3/9: 0 gives the printed equations).
    alignment_reduction: Literal["all_channels", "present"] = "all_channels"
    margin: NonNegativeFloat = 0.05
    # L_local on the pixels MGA kept (authors) or on all pixels; the masked branch's scale in L_local (paper 1.0,
    # KTSE+ code 1.3).
    local_on_kept: bool = True
    local_scale: Annotated[float, Field(gt=0.0)] = 1.0
    # MGA: the most discriminative region (normalised CAM ≥ this) is erased for the masked branch.
    erase_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.6

    # Added later, at the value that reproduces the earlier models: left out of the stage key (``key_dump``).
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"label_norm": "min_max", "label_norm_at": "input",
                                             "ssr_refine": "none", "par": ParConfig()}

    @model_validator(mode="after")
    def _thresholds(self) -> KtseLossConfig:
        if self.beta_l > self.beta_h:
            raise ValueError(f"beta_l ({self.beta_l}) must not exceed beta_h ({self.beta_h})")
        return self
