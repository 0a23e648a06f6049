"""Building blocks of the per-pixel losses every method family uses.

Conventions shared by every loss here:

* ``logits`` (N, C, H, W), label maps (N, H, W) int64 with 255 (``IGNORE_LABEL``) = ignore.
* The maths runs in float32 (``logits.float()``; float64 is kept, for gradcheck), so the losses are safe under
  bf16 autocast.
* No data-dependent Python branches and no ``.item()``: selections are boolean masks and every mean is
  ``masked sum / max(count, 1)``. An empty selection therefore gives an exact 0 that is still a function of
  ``logits`` (a zero gradient, not a missing one), which keeps DDP's gradient all-reduce in step, and nothing
  forces a host-device sync on CUDA.
* Every data-dependent denominator is the global batch's (:func:`global_mean`): with W DDP workers each worker
  returns ``W · s_r / n_global``, so DDP's gradient mean is the gradient of ``Σ_r s_r / n_global``, the loss of
  the whole global batch in one process, whatever W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wsss_ray.core.labels import IGNORE_LABEL


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bf16/float32 inputs (loss maths in float32 under autocast); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def check_label_map(logits: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` unless logits is (N, C, H, W) and ``labels`` is (N, H, W)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    if tuple(labels.shape) != (n, h, w):
        raise ValueError(f"{name} must be (N, H, W) = {(n, h, w)} to match logits, got {tuple(labels.shape)}")


def pixel_log_probs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log-softmax of float32 logits, log p_target per pixel (N, H, W), and the labelled-pixel mask.

    Ignored pixels gather class 0 (any valid index would do); callers mask them out, so their value never counts.
    """
    log_p = F.log_softmax(upcast(logits), dim=1)
    target = target.long()
    labelled = target != IGNORE_LABEL
    safe_target = torch.where(labelled, target, torch.zeros_like(target))
    log_p_target = log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return log_p, log_p_target, labelled


def global_mean(total: torch.Tensor, count: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
    """``total / n`` as this worker's share of the global batch: ``W · total / all_reduce_sum(count)``.

    ``n`` is ``count`` summed over the DDP workers and raised to ``floor`` when below it (an empty selection gives
    0 with a gradient path); one process (no process group) divides by its own count. A pixel count carries no
    gradient; a differentiable one (BANA's Σσ) keeps the gradient of this worker's share, while its value is the
    global sum. Every worker must call it the same number of times per step (the losses have no data-dependent
    branches).
    """
    local = count.to(total.dtype)
    summed = local.detach().clone()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(summed)
    if local.requires_grad:
        summed = summed + (local - local.detach())
    return total * world / summed.clamp_min(floor)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (of the global batch, :func:`global_mean`); 0 when the mask is empty, still differentiable w.r.t. ``values``.

    ``torch.where`` rather than ``values * mask``: an unselected entry that happens to be inf (e.g. the logits of
    a padded pixel) must not turn the sum into NaN.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return global_mean(total, mask.sum())
