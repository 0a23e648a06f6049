"""The noise-robust losses OuT (Feng et al., PRL 2022) borrows from learning with noisy labels in
classification: :func:`cross_entropy` (optionally label-smoothed), :func:`symmetric_cross_entropy` (SCE, Wang et
al. ICCV 2019, OuT Eq. 2) and :func:`curriculum_cross_entropy` (noise-pruned curriculum loss, Lyu & Tsang 2019).
Pure functions over tensors (conventions: ``wsss_ray.maths.pixel_losses``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.pixel_losses import check_label_map, global_mean, masked_mean, pixel_log_probs
from wsss_ray.methods.robust.config import CrossEntropyConfig

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(config: CrossEntropyConfig) -> Loss:
    """Pixel-wise CE over labelled pixels (255 ignored), optionally label-smoothed."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # F.cross_entropy's mean is the sum over the labelled pixels / their count: taken over the global batch
        # (and 0 with a gradient path when every pixel is ignored, where the mean would be NaN).
        total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE_LABEL,
                                label_smoothing=config.label_smoothing, reduction="sum")
        return global_mean(total, (target != IGNORE_LABEL).sum())

    return loss


def symmetric_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                            log_clip: float = -4.0) -> torch.Tensor:
    """Symmetric cross-entropy (SCE; Wang et al. ICCV 2019; OuT Eq. 2): ``α·CE + β·RCE``.

    With y the one-hot label and p = softmax(logits), per labelled pixel
    ``CE = −Σ_c y_c log p_c = −log p_t`` and the reverse cross-entropy ``RCE = −Σ_c p_c log y_c``, where
    log 0 is clipped to ``A = log_clip`` (Wang et al. use A = −4), so ``RCE = −A·(1 − p_t)``. Both terms are
    averaged over the labelled pixels of the whole batch (OuT's 1/N with N = number of pixels); 255 is ignored.

    Args:
        logits: (N, C, H, W) segmentation scores.
        target: (N, H, W) int64 labels, 255 = ignore.
        alpha: weight α of CE (OuT: 0.1).
        beta: weight β of RCE (OuT: 1.0).
        log_clip: A, the value that replaces log 0 in RCE (negative).

    Returns:
        Scalar float32 loss; exactly 0 (with a gradient path) when every pixel is ignored.
    """
    check_label_map(logits, target, "target")
    _, log_p_target, labelled = pixel_log_probs(logits, target)
    ce = -log_p_target
    # RCE needs only p_t: Σ_{c≠t} p_c·A + p_t·log 1 = A·(1 − p_t).
    rce = -log_clip * (1.0 - log_p_target.exp())
    return alpha * masked_mean(ce, labelled) + beta * masked_mean(rce, labelled)


def curriculum_cross_entropy(logits: torch.Tensor, target: torch.Tensor, epsilon: float = 0.25,
                             rank: str = "batch") -> torch.Tensor:
    """Noise-pruned curriculum loss (Lyu & Tsang 2019, as used by OuT): CE with the largest-loss pixels pruned.

    Per-pixel ``ℓ_i = −log p_{y_i}`` over the n labelled pixels of the batch; the ``floor(ϵ·n)`` pixels with the
    largest ℓ_i are treated as noisy and dropped; the loss is the mean of ℓ over the rest. The selection is made on
    detached losses (it is a hard choice of pixels, not differentiated through), so dropped pixels get no gradient.

    Our reading: OuT says "discards the samples with large loss values at a certain rate ϵ" without saying over
    which set. ``rank="batch"`` (default) ranks all labelled pixels of the batch together (one pixel = one
    sample), not per image; ``rank="class"`` drops ``floor(ϵ·n_c)`` of the ``n_c`` pixels labelled c, for each
    class c. Either way the mean is over every kept pixel. Ties at the cut are broken arbitrarily (they do not
    change the value). 255 pixels are neither ranked nor counted.

    Args:
        logits: (N, C, H, W) segmentation scores.
        target: (N, H, W) int64 labels, 255 = ignore.
        epsilon: ϵ ∈ [0, 1], the fraction of labelled pixels dropped (OuT: 0.25).
        rank: ``"batch"`` or ``"class"``: the set each fraction is taken of.

    Returns:
        Scalar float32 loss; 0 (with a gradient path) when no pixel is labelled or every pixel is dropped.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if rank not in ("batch", "class"):
        raise ValueError(f"rank must be 'batch' or 'class', got {rank!r}")
    check_label_map(logits, target, "target")
    _, log_p_target, labelled = pixel_log_probs(logits, target)
    ce = (-log_p_target).flatten()
    labelled = labelled.flatten()
    # Groups: one per class ("class") or one for the batch; ignored pixels form a group of their own (never kept).
    num_classes = logits.shape[1]
    group = target.flatten().long() if rank == "class" else torch.zeros_like(labelled, dtype=torch.int64)
    group = torch.where(labelled, group, torch.full_like(group, num_classes))
    # Rank on device without reading counts back to the host: sort by descending loss, then (stably) by group,
    # so each group's pixels are contiguous in descending-loss order; a pixel's rank in its group is its position
    # minus the group's start, compared with k_g = floor(ϵ·n_g) as a tensor.
    by_loss = torch.argsort(ce.detach(), descending=True, stable=True)
    order = by_loss[torch.argsort(group[by_loss], stable=True)]
    counts = torch.bincount(group, minlength=num_classes + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    rank_in_group = position - starts[group]
    num_dropped = torch.floor(epsilon * counts.to(torch.float64)).to(torch.int64)
    kept = labelled & (rank_in_group >= num_dropped[group])
    return masked_mean(ce, kept)
