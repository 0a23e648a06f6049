"""Config of OuT (Feng et al., PRL 2022): the online pseudo-mask corrector with an EMA teacher."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wsss_ray.core.config_base import Fraction, PositiveInt, StrictModel


class OutCorrectorConfig(StrictModel):
    """OuT: an EMA teacher (v = 0.999) corrects the pseudo-masks from the inflection epoch on."""

    name: Literal["out"] = "out"
    # Number of epochs trained on the raw pseudo-masks before correction starts: corrections run from 0-based
    # epoch ``inflection_epoch`` on (the 5th epoch when counting from 1). OuT: "the correct timing selects the 4
    # epoch" (the inflection it sees at 3-5), i.e. after 4 completed epochs (the paper's teacher share
    # 0.999^(4·1058) = 1.4% of its initial weights is this reading).
    inflection_epoch: PositiveInt = 4
    strategy: Literal["replace", "ema", "nnss"] = "nnss"
    # online: correct the original pseudo-mask each time; cumulative: the corrected mask is carried forward.
    mode: Literal["online", "cumulative"] = "online"
    ema_decay: Fraction = 0.999
    # Teacher confidence needed to replace a label (``replace``) or to keep a pixel (``nnss``; OuT: 0.7).
    confidence: Fraction = 0.7
    # v_m of the EMA mask update M_t = v_m·M_{t−1} + (1 − v_m)·P_t (``ema``). The paper does not give it; with
    # the one-hot pseudo-mask as M_{t−1} a label only changes when v_m < 0.5 (see methods/out_correction/correction.py).
    mask_momentum: Fraction = 0.3
    # Input scale of the teacher's forward pass (its probabilities are upsampled back). 1.0 is the paper; 0.5
    # cuts the teacher's cost to a quarter (bench/robust_training.py) for coarser corrections at boundaries.
    teacher_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # Number format of the teacher's forward pass. The teacher only ranks classes and gates them at
    # ``confidence``, which bfloat16 barely moves (bench/robust_training.py: >99% identical argmax), at about
    # half the cost where the hardware runs bf16 natively. ``auto``: bfloat16 on such hardware (CUDA with bf16,
    # CPUs with AVX-512 BF16 / AMX), float32 elsewhere (emulated bf16 would be slower).
    teacher_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # The teacher's BatchNorm statistics. The paper is silent (Eq. 1 averages "the parameters"). ``ema``: float
    # buffers (running mean/var) follow the same lerp as the weights, integer ones (num_batches_tracked) are
    # copied (timm's ModelEma): the eval-mode teacher's statistics then describe the averaged weights, not the
    # current student. ``copy``: every buffer copied from the student (torch AveragedModel / mmengine default).
    teacher_buffers: Literal["ema", "copy"] = "ema"
