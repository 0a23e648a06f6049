"""Config of the noise-robust techniques from classification that OuT evaluates: label smoothing (in the plain
cross-entropy), SCE, the noise-pruned curriculum loss and robust early-learning."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wsss_ray.core.config import Fraction, StrictModel


class CrossEntropyConfig(StrictModel):
    """Pixel-wise cross-entropy; label 255 is ignored. ``label_smoothing`` 0.2 is OuT's LS setting."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: Fraction = 0.0


class SymmetricCrossEntropyConfig(StrictModel):
    """SCE (Wang et al. 2019): α·CE + β·RCE, RCE = −Σ p log y with log 0 clipped to ``log_clip`` (A = −4)."""

    name: Literal["sce"] = "sce"
    alpha: Annotated[float, Field(ge=0.0)] = 0.1
    beta: Annotated[float, Field(ge=0.0)] = 1.0
    log_clip: Annotated[float, Field(lt=0.0)] = -4.0


class CurriculumConfig(StrictModel):
    """Noise-pruned curriculum loss: the fraction ϵ of labelled pixels with the largest loss is dropped."""

    name: Literal["curriculum"] = "curriculum"
    epsilon: Fraction = 0.25


class EarlyLearningConfig(StrictModel):
    """Robust early-learning (Xia et al. ICLR 2021): only the top-K fraction of parameters by |∇L·w| get the loss
    gradient; the others only decay (weight decay), so they cannot memorise noisy labels."""

    key_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
