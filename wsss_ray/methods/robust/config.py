"""Config of the noise-robust techniques from classification that OuT evaluates: label smoothing (in the plain
cross-entropy), SCE, the noise-pruned curriculum loss and robust early-learning."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from wsss_ray.core.config_base import Fraction, StrictModel


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
    """Noise-pruned curriculum loss: the fraction ϵ of labelled pixels with the largest loss is dropped.

    OuT says nothing on over which set or from when; the defaults (the whole batch, from the first step) are our
    reading of "discards the samples with large loss values at a certain rate ϵ".
    """

    name: Literal["curriculum"] = "curriculum"
    epsilon: Fraction = 0.25
    # 0-based epoch from which pixels are dropped; before it the loss is the plain CE mean. ``inflection``: the
    # corrector's ``inflection_epoch`` (OuT's 4 without a corrector), when the net starts to memorise noise.
    start_epoch: Annotated[int, Field(ge=0)] | Literal["inflection"] = 0
    # ``batch``: floor(ϵ·n) of all n labelled pixels of the batch; ``class``: floor(ϵ·n_c) of each class's n_c,
    # so rarer, harder classes (foreground) are not the ones pruned wholesale.
    rank: Literal["batch", "class"] = "batch"


class EarlyLearningConfig(StrictModel):
    """Robust early-learning (Xia et al. ICLR 2021): only the top-K fraction of parameters by |∇L·w| get the loss
    gradient; the others only decay (weight decay), so they cannot memorise noisy labels."""

    key_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    # ``global``: one threshold over all conv/linear weights together (the paper sorts all parameters; the
    # authors' CDR code ranks the 2-D/4-D weights and leaves biases and norm parameters alone). ``per_tensor``:
    # our earlier reading, each tensor (biases included) keeps its own top fraction.
    ranking: Literal["global", "per_tensor"] = "global"

    # Added later, at the value that reproduces the earlier models: left out of the stage key (``key_dump``).
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"ranking": "per_tensor"}
