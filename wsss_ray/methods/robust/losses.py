"""The noise-robust losses OuT (Feng et al., PRL 2022) borrows from learning with noisy labels in
classification: :func:`cross_entropy` (optionally label-smoothed), :func:`symmetric_cross_entropy` (SCE, Wang et
al. ICCV 2019, OuT Eq. 2) and :func:`curriculum_cross_entropy` (noise-pruned curriculum loss, Lyu & Tsang 2019).
Pure functions over tensors (conventions: ``wsss_ray.core.pixel_losses``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.core.pixel_losses import check_label_map, global_mean, masked_mean, pixel_log_probs
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


def curriculum_cross_entropy(logits: torch.Tensor, target: torch.Tensor, epsilon: float = 0.25) -> torch.Tensor:
    """Noise-pruned curriculum loss (Lyu & Tsang 2019, as used by OuT): CE with the largest-loss pixels pruned.

    Per-pixel ``ℓ_i = −log p_{y_i}`` over the n labelled pixels of the batch; the ``floor(ϵ·n)`` pixels with the
    largest ℓ_i are treated as noisy and dropped; the loss is the mean of ℓ over the rest. The selection is made on
    detached losses (it is a hard choice of pixels, not differentiated through), so dropped pixels get no gradient.

    Our reading: OuT says "discards the samples with large loss values at a certain rate ϵ" without saying over
    which set; we rank all labelled pixels of the batch together (one pixel = one sample), not per image. Ties at
    the cut are broken arbitrarily (they do not change the value). 255 pixels are neither ranked nor counted.

    Args:
        logits: (N, C, H, W) segmentation scores.
        target: (N, H, W) int64 labels, 255 = ignore.
        epsilon: ϵ ∈ [0, 1], the fraction of labelled pixels dropped (OuT: 0.25).

    Returns:
        Scalar float32 loss; 0 (with a gradient path) when no pixel is labelled or every pixel is dropped.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    check_label_map(logits, target, "target")
    _, log_p_target, labelled = pixel_log_probs(logits, target)
    ce = (-log_p_target).flatten()
    labelled = labelled.flatten()
    # Rank on device without reading n back to the host: ignored pixels sort last (−inf), and the rank of each
    # pixel in descending-loss order is compared with k = floor(ϵ·n) as a tensor.
    score = torch.where(labelled, ce.detach(), torch.full_like(ce, -math.inf))
    order = torch.argsort(score, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    num_dropped = torch.floor(epsilon * labelled.sum().to(torch.float64)).to(torch.int64)
    kept = labelled & (rank >= num_dropped)
    return masked_mean(ce, kept)
