"""BANA's noise-aware loss (Oh, Kim, Ham, CVPR 2021, Eqs. 10-14). Conventions: ``wsss_ray.maths.pixel_losses``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_ray.maths.pixel_losses import check_label_map, global_mean, masked_mean, pixel_log_probs, upcast


def noise_aware_loss(logits: torch.Tensor, features: torch.Tensor, classifier_weight: torch.Tensor,
                     y_crf: torch.Tensor, y_ret: torch.Tensor, gamma: float = 7.0,
                     lambda_wce: float = 0.1, detach_sigma: bool = False,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BANA's noise-aware loss (NAL, Eqs. 10-14): ``L = L_ce + λ·L_wce``.

    * S = pixels labelled in Y_crf where Y_crf == Y_ret (the two pseudo-labels agree):
      ``L_ce = −(1/|S|) Σ_{p∈S} log H_{c*}(p)`` (Eq. 10), H = softmax(logits), c* = Y_crf(p).
    * ~S = pixels labelled in Y_crf where Y_ret disagrees (including Y_ret = 255). Correlation with the final
      classifier's weights ``D_c(p) = 1 + cos(φ(p), W_c)`` (Eq. 11), confidence
      ``σ(p) = (D_{c*}(p) / max_c D_c(p))^γ`` (Eq. 12), and
      ``L_wce = −Σ_{p∈~S} σ(p) log H_{c*}(p) / Σ_{p∈~S} σ(p)`` (Eq. 13).

    Our readings:

    * The cosine map is computed at feature resolution (φ is the stride-8/16 input of the 1×1 classifier) and
      upsampled bilinearly (align_corners=False) to the label size, like the logits themselves; the authors' code
      instead upsamples cosine-classifier logits with align_corners=True, which differs only at sub-pixel level.
    * σ is not detached by default (``detach_sigma=False``): the paper is silent, and the authors' released code
      (cvlab-yonsei/BANA, ``stage3_vgg.py``) back-propagates through σ, numerator and denominator of Eq. 13.
      ``detach_sigma=True`` is our earlier reading (σ a fixed weight: otherwise the loss can also be lowered by
      pulling φ away from W_{c*}, shrinking σ of hard pixels).
    * With the cosine head (``SegModelConfig.classifier = "cosine"``, NAL's default) the logits are τ·cos(φ, W),
      so the cos here equals logits/τ in eval mode; with the linear head it is the cos of the conv's weights.
    * Empty S or ~S contributes 0 (not NaN); a pixel that Y_crf ignores (255) is in neither set.

    Args:
        logits: (N, C, H, W) segmentation scores at label resolution.
        features: (N, D, h, w) φ, the features fed to the final classifier.
        classifier_weight: (C, D) W (a (C, D, 1, 1) conv weight is accepted too).
        y_crf: (N, H, W) int64 Y_crf, 255 = ignore; its label is c*.
        y_ret: (N, H, W) int64 Y_ret, 255 = no retrieval label.
        gamma: damping γ ≥ 1 (BANA: 7).
        lambda_wce: λ, the weight of L_wce (BANA: 0.1).
        detach_sigma: stop the gradient through σ (default False, as the authors' code).

    Returns:
        (L, terms) with terms "ce" (L_ce), "wce" (L_wce) and "agree_fraction" (|S| / pixels labelled in Y_crf, 0 if
        none), all detached.
    """
    check_label_map(logits, y_crf, "y_crf")
    check_label_map(logits, y_ret, "y_ret")
    num_classes = logits.shape[1]
    if features.dim() != 4 or features.shape[0] != logits.shape[0]:
        raise ValueError(f"features must be (N, D, h, w) with N = {logits.shape[0]}, got {tuple(features.shape)}")
    weight = classifier_weight.flatten(1)
    if tuple(weight.shape) != (num_classes, features.shape[1]):
        raise ValueError(f"classifier_weight must be (C, D) = {(num_classes, features.shape[1])}, "
                         f"got {tuple(classifier_weight.shape)}")

    _, log_h_star, labelled = pixel_log_probs(logits, y_crf)
    y_crf = y_crf.long()
    agree = labelled & (y_crf == y_ret.long())
    disagree = labelled & ~agree
    loss_ce = masked_mean(-log_h_star, agree)

    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_sigma):
        # cos(φ, W_c) at feature resolution, then resized like the logits (gradient per ``detach_sigma``).
        cos = torch.einsum("ndhw,cd->nchw", F.normalize(upcast(features), dim=1), F.normalize(upcast(weight), dim=1))
        cos = F.interpolate(cos, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        correlation = 1.0 + cos  # D_c ∈ [0, 2]
        safe_crf = torch.where(labelled, y_crf, torch.zeros_like(y_crf))
        d_star = correlation.gather(1, safe_crf.unsqueeze(1)).squeeze(1)
        # D ≥ 0, and max_c D_c = 0 would need every W_c antiparallel to φ; the floor only avoids 0/0.
        sigma = (d_star / correlation.amax(dim=1).clamp_min(1e-12)) ** gamma
        sigma = torch.where(disagree, sigma, torch.zeros_like(sigma))
    weighted = torch.where(disagree, sigma * -log_h_star, torch.zeros_like(log_h_star))
    # Σσ of the global batch; 0 (nothing disagrees anywhere) divides by 1, not by a tiny positive floor.
    loss_wce = global_mean(weighted.sum(), sigma.sum(), floor=torch.finfo(sigma.dtype).tiny)
    loss = loss_ce + lambda_wce * loss_wce

    agree_fraction = agree.sum().float() / labelled.sum().clamp_min(1).float()
    terms = {"ce": loss_ce.detach(), "wce": loss_wce.detach(), "agree_fraction": agree_fraction.detach()}
    return loss, terms
