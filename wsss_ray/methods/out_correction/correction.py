"""OuT's online pseudo-mask correction (Feng et al., Pattern Recognition Letters 2022).

An EMA teacher of the online segmentation net (Eq. 1, ``θ_ema ← v·θ_ema + (1−v)·θ``, v = 0.999) predicts
class probabilities P_t; from the inflection epoch on, those predictions correct the pseudo-masks before the
student's loss is computed, with one of the paper's three strategies (Sec. 3.1): direct replacement, EMA update
of the soft mask, or non-noise sample selection (NNSS, the paper's best: 65.3 mIoU online on VOC val).

Online vs cumulative correction (Table 3) is the caller's choice of which mask it passes as ``pseudo``: the
original pseudo-mask every time (online, the better one) or the previous corrected mask (cumulative). The
functions here are pure tensor maths, batched (N first) and device-agnostic, so they run inside the training
step on the GPU; only :func:`correction_stats` synchronises (it returns Python floats for logging).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.core.torch_helpers import unwrap

STRATEGIES = ("replace", "ema", "nnss")
BUFFER_MODES = ("ema", "copy")


class EmaTeacher:
    """The OuT teacher: an exponential moving average of the online segmentation net's parameters.

    Eq. (1): ``θ_t^EMA = v·θ_{t−1}^EMA + (1 − v)·θ_t`` with the paper's constant v = 0.999 and no bias
    correction. The teacher is a deep copy of the student (same device and dtypes) held in eval mode with
    ``requires_grad`` False, so it never enters the student's autograd graph or optimiser.

    ``buffers`` (keyword-only): ``"ema"`` (default) averages the floating-point buffers (BatchNorm running
    mean/var) with the same v and copies the others (``num_batches_tracked``); ``"copy"`` copies every buffer
    from the student. The paper is silent on buffers; see ``OutCorrectorConfig.teacher_buffers``.

    ``step`` counts the updates applied. ``warmup`` (keyword-only, off by default = the paper) uses the
    effective decay ``min(v, (1 + step)/(10 + step))`` (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``), so that early on the teacher follows the student instead of its initialisation; OuT needs
    no warm-up because corrections only start at the inflection epoch, by which time (1−v)-weighted averaging
    over thousands of steps has long forgotten the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False,
                 buffers: str = "ema") -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.decay = decay
        self.buffers = buffers
        self.warmup = warmup
        self.step = 0
        self.model = copy.deepcopy(unwrap(model))
        self.model.eval()
        self.model.requires_grad_(False)
        for parameter in self.model.parameters():
            # deepcopy also copies .grad; the teacher never needs one, so don't hold the memory.
            parameter.grad = None

    def current_decay(self) -> float:
        """The v the next :meth:`update` uses: the constant ``decay``, or its warm-up ramp when enabled."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.step) / (10.0 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the (possibly DDP-wrapped) student: θ_ema ← v·θ_ema + (1 − v)·θ, in place.

        Buffers: with ``buffers="ema"`` every floating-point buffer b follows the same b_ema ← v·b_ema + (1 − v)·b
        (the statistics then belong to the averaged weights the eval-mode teacher runs); integer buffers such as
        ``num_batches_tracked`` cannot be averaged and are copied. ``buffers="copy"`` copies them all.
        """
        student = unwrap(model)
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        teacher_buffers = dict(self.model.named_buffers())
        student_buffers = dict(student.named_buffers())
        if teacher_params.keys() != student_params.keys() or teacher_buffers.keys() != student_buffers.keys():
            missing = (teacher_params.keys() | teacher_buffers.keys()) ^ (student_params.keys()
                                                                         | student_buffers.keys())
            raise ValueError(f"student and teacher differ in parameters/buffers: {sorted(missing)[:5]}")
        v = self.current_decay()
        averaged = list(teacher_params)
        copied = []
        for name, buffer in teacher_buffers.items():
            (averaged if self.buffers == "ema" and buffer.is_floating_point() else copied).append(name)
        teacher_tensors = {**teacher_params, **teacher_buffers}
        student_tensors = {**student_params, **student_buffers}
        ema = [teacher_tensors[name] for name in averaged]
        # .to(dtype) so a student converted to another precision still averages into the teacher's dtype.
        online = [student_tensors[name].detach().to(ema_t.dtype) for name, ema_t in zip(averaged, ema)]
        # One foreach lerp: θ_ema + (1 − v)(θ − θ_ema) = v·θ_ema + (1 − v)·θ in a single pass over the weights,
        # fused per dtype/device instead of launches for each of the hundreds of tensors of a DeepLab.
        if ema:  # foreach ops reject empty lists (a parameter-free network)
            torch._foreach_lerp_(ema, online, 1.0 - v)
        for name in copied:
            teacher_buffers[name].copy_(student_buffers[name])
        self.step += 1

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """P_t = softmax over classes of the teacher's logits, (N, C, H, W), in float32 (also under autocast)."""
        logits = self.model(images)
        return logits.float().softmax(dim=1)

    def state_dict(self) -> dict[str, Any]:
        """The teacher's weights and ``step`` (tensors and ints only: loadable with ``weights_only=True``)."""
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. ``decay``/``warmup`` stay as constructed: the run's config decides."""
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])


def _check_inputs(pseudo: torch.Tensor, teacher_probs: torch.Tensor, valid: torch.Tensor) -> None:
    if teacher_probs.dim() != 4:
        raise ValueError(f"teacher_probs must be (N, C, H, W), got shape {tuple(teacher_probs.shape)}")
    if pseudo.dim() != 3:
        raise ValueError(f"pseudo must be (N, H, W), got shape {tuple(pseudo.shape)}")
    expected = (teacher_probs.shape[0], *teacher_probs.shape[2:])
    if tuple(pseudo.shape) != expected:
        raise ValueError(f"pseudo shape {tuple(pseudo.shape)} disagrees with teacher_probs shape "
                         f"{tuple(teacher_probs.shape)} (expected pseudo {expected})")
    if valid.shape != pseudo.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} disagrees with pseudo shape {tuple(pseudo.shape)}")
    if pseudo.is_floating_point() or pseudo.dtype == torch.bool:
        raise ValueError(f"pseudo must hold integer labels, got dtype {pseudo.dtype}")


def correct_pseudo_masks(pseudo: torch.Tensor, teacher_probs: torch.Tensor, valid: torch.Tensor, strategy: str,
                         confidence: float = 0.7, mask_momentum: float = 0.3) -> torch.Tensor:
    """Correct the pseudo-masks Y (N, H, W; 255 = ignore) with the teacher's predictions P_t (N, C, H, W).

    Pixels where ``valid`` is False (padding from the crop) are 255 in the result whatever the strategy.
    With ŷ = argmax_c P_t and p̂ = max_c P_t:

    * ``"replace"`` (direct replacement): ŷ where p̂ ≥ ``confidence``, Y elsewhere. Our reading of "high
      confidence": the same threshold as NNSS (0.7; the paper gives none for this strategy); pixels that were
      255 are labelled too, since a confident teacher is the whole point of the correction.
    * ``"ema"`` (EMA update of the soft mask): ``M_t = v_m·M_{t−1} + (1 − v_m)·P_t`` with M_{t−1} = onehot(Y)
      (the hard pseudo-mask, as both the online and cumulative modes hand a label map) and v_m =
      ``mask_momentum``; the label is argmax_c M_t, ties kept as Y. At pixels where Y is 255 onehot is 0, so
      M_t ∝ P_t: the label is ŷ if p̂ ≥ ``confidence``, else 255 (our reading: the same gate as ``replace``,
      so that an unsure teacher does not label what the pseudo-mask left ignored). Where Y = y is a class,
      M_y = v_m + (1 − v_m)P_y and M_c = (1 − v_m)P_c, so the label changes to c only where
      (1 − v_m)(P_c − P_y) > v_m: v_m must be below 0.5 to ever correct anything. The paper does not give
      v_m; the default 0.3 flips a label when the teacher prefers another class by more than 3/7 ≈ 0.43.
    * ``"nnss"`` (non-noise sample selection, the paper's best): keep Y where Y = ŷ and p̂ ≥ ``confidence``
      (0.7 in the paper); every other pixel becomes 255.

    The teacher's argmax runs over all C classes (the paper does not restrict it to the image's tags).
    Returns the corrected (N, H, W) int64 mask on the inputs' device; no gradient flows (labels only).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown correction strategy {strategy!r}; expected one of {STRATEGIES}")
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {confidence}")
    if not 0.0 <= mask_momentum <= 1.0:
        raise ValueError(f"mask_momentum must be in [0, 1], got {mask_momentum}")
    _check_inputs(pseudo, teacher_probs, valid)
    pseudo = pseudo.long()
    valid = valid.bool()
    probs = teacher_probs.detach().float()
    num_classes = probs.shape[1]
    labelled = pseudo != IGNORE_LABEL
    if bool((labelled & ((pseudo < 0) | (pseudo >= num_classes))).any()):
        # A label outside [0, C) means the pseudo-masks and the model disagree on the class list: fail loudly.
        raise ValueError(f"pseudo holds labels outside [0, {num_classes}) other than {IGNORE_LABEL}")
    top_prob, top_class = probs.max(dim=1)
    confident = top_prob >= confidence
    ignore = torch.full_like(pseudo, IGNORE_LABEL)

    if strategy == "replace":
        corrected = torch.where(confident, top_class, pseudo)
    elif strategy == "nnss":
        corrected = torch.where(labelled & (pseudo == top_class) & confident, pseudo, ignore)
    else:
        # Clamp only to index safely: the one-hot of an ignored pixel is zeroed just below.
        safe = torch.where(labelled, pseudo, torch.zeros_like(pseudo))
        onehot = torch.zeros_like(probs).scatter_(1, safe.unsqueeze(1), 1.0) * labelled.unsqueeze(1)
        soft = mask_momentum * onehot + (1.0 - mask_momentum) * probs
        soft_top, soft_class = soft.max(dim=1)
        # On a tie keep the pseudo-label (argmax would return the lowest index): change needs a strict win.
        keep = soft.gather(1, safe.unsqueeze(1)).squeeze(1) >= soft_top
        on_labelled = torch.where(keep, pseudo, soft_class)
        on_ignored = torch.where(confident, top_class, ignore)
        corrected = torch.where(labelled, on_labelled, on_ignored)
    return torch.where(valid, corrected, ignore)


def correction_stats(before: torch.Tensor, after: torch.Tensor,
                     valid: torch.Tensor | None = None) -> dict[str, float]:
    """How much a correction changed a batch of masks, as fractions of the valid pixels (for logging).

    ``changed``: labelled before and after, with a different class; ``newly_ignored``: labelled before, 255
    after; ``newly_labelled``: 255 before, labelled after; ``labelled_before`` / ``labelled_after``: the
    labelled fraction of each mask (what NNSS keeps). Our reading of "over valid pixels": every fraction has
    the number of valid pixels as denominator (all pixels when ``valid`` is None), so they add up and stay
    comparable across batches; with no valid pixel every fraction is 0.
    """
    if before.shape != after.shape:
        raise ValueError(f"before shape {tuple(before.shape)} disagrees with after shape {tuple(after.shape)}")
    if valid is None:
        valid = torch.ones_like(before, dtype=torch.bool)
    elif valid.shape != before.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} disagrees with mask shape {tuple(before.shape)}")
    valid = valid.bool()
    was = (before != IGNORE_LABEL) & valid
    now = (after != IGNORE_LABEL) & valid
    counts = torch.stack([
        (was & now & (before != after)).sum(),
        (was & ~now).sum(),
        (~was & now).sum(),
        was.sum(),
        now.sum(),
    ]).double() / max(int(valid.sum()), 1)
    keys = ("changed", "newly_ignored", "newly_labelled", "labelled_before", "labelled_after")
    return dict(zip(keys, counts.tolist()))
