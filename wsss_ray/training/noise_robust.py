"""Noise-robust segmentation losses for training on pseudo-masks: OuT's toolbox, BANA's NAL, MSPN's hybrid loss.

Pure functions over tensors; the segmentation trainer picks one and calls it once per step.

* OuT (Feng et al., PRL 2022) borrows three techniques from learning with noisy labels in classification:
  :func:`symmetric_cross_entropy` (SCE, Wang et al. ICCV 2019, OuT Eq. 2), :func:`curriculum_cross_entropy`
  (noise-pruned curriculum loss, Lyu & Tsang 2019) and :class:`EarlyLearning` (robust early-learning, Xia et al.
  ICLR 2021, OuT Eq. 3), which edits gradients between ``backward()`` and ``optimizer.step()``.
* BANA (Oh, Kim, Ham, CVPR 2021): :func:`noise_aware_loss`, the NAL of Eqs. 10-14.
* MSPN (Sang et al., JEIT 2025): :func:`mspn_hybrid_loss`, positive-negative hybrid learning on multi-seed votes,
  and :func:`decode_proposed`, which unpacks the per-pixel bitmask of proposed labels the pseudo-label stage stores.

Conventions shared by every loss here:

* ``logits`` (N, C, H, W), label maps (N, H, W) int64 with 255 (``IGNORE_LABEL``) = ignore.
* The maths runs in float32 (``logits.float()``; float64 is kept, for gradcheck), so the losses are safe under
  bf16 autocast.
* No data-dependent Python branches and no ``.item()``: selections are boolean masks and every mean is
  ``masked sum / max(count, 1)``. An empty selection therefore gives an exact 0 that is still a function of
  ``logits`` (a zero gradient, not a missing one), which keeps DDP's gradient all-reduce in step, and nothing
  forces a host-device sync on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.data.classes import IGNORE_LABEL

__all__ = [
    "EarlyLearning",
    "curriculum_cross_entropy",
    "decode_proposed",
    "mspn_hybrid_loss",
    "noise_aware_loss",
    "symmetric_cross_entropy",
]

# Floor of 1 − p_c inside log(1 − p_c): p_c → 1 would otherwise give log 0 = −inf (MSPN negative learning).
_ONE_MINUS_P_MIN = 1e-6


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bf16/float32 inputs (loss maths in float32 under autocast); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _check_label_map(logits: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` unless logits is (N, C, H, W) and ``labels`` is (N, H, W)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    if tuple(labels.shape) != (n, h, w):
        raise ValueError(f"{name} must be (N, H, W) = {(n, h, w)} to match logits, got {tuple(labels.shape)}")


def _pixel_log_probs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log-softmax of float32 logits, log p_target per pixel (N, H, W), and the labelled-pixel mask.

    Ignored pixels gather class 0 (any valid index would do); callers mask them out, so their value never counts.
    """
    log_p = F.log_softmax(_upcast(logits), dim=1)
    target = target.long()
    labelled = target != IGNORE_LABEL
    safe_target = torch.where(labelled, target, torch.zeros_like(target))
    log_p_target = log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return log_p, log_p_target, labelled


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 when the mask is empty, still differentiable w.r.t. ``values``.

    ``torch.where`` rather than ``values * mask``: an unselected entry that happens to be inf (e.g. the logits of
    a padded pixel) must not turn the sum into NaN.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


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
    _check_label_map(logits, target, "target")
    _, log_p_target, labelled = _pixel_log_probs(logits, target)
    ce = -log_p_target
    # RCE needs only p_t: Σ_{c≠t} p_c·A + p_t·log 1 = A·(1 − p_t).
    rce = -log_clip * (1.0 - log_p_target.exp())
    return alpha * _masked_mean(ce, labelled) + beta * _masked_mean(rce, labelled)


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
    _check_label_map(logits, target, "target")
    _, log_p_target, labelled = _pixel_log_probs(logits, target)
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
    return _masked_mean(ce, kept)


class EarlyLearning:
    """Robust early-learning (Xia et al., ICLR 2021, "Robust early-learning: hindering the memorization of noisy
    labels"; OuT Eq. 3): only the critical parameters learn from the loss, the rest decay to zero.

    Importance of parameter w_i: ``g_i = |∇L(w_i) ⊙ w_i|`` (OuT Eq. 3). The top ``K = key_fraction`` of
    parameters by g are *critical* and keep their loss gradient; the others have it set to zero, so SGD's weight
    decay is the only force left on them and "pushes them to zero". Call :meth:`apply` after ``loss.backward()``
    and before ``optimizer.step()`` (after the last backward of a gradient-accumulation window; under DDP the
    gradients are already all-reduced then, so every rank keeps the same set).

    Selection scope — per tensor, here. Each parameter tensor keeps its own top ``max(1, floor(K·numel))``
    entries, so every layer (biases and norm layers included) keeps learning something. This is *not* what the
    references do: OuT says "we sort all parameters according to the g_i and select the top K", and the authors'
    code (xiaoboxia/CDR, ``train_one_step``) thresholds one global top-K over the concatenation of all 2-D/4-D
    weights, leaves biases and norm parameters untouched, and also multiplies the kept gradients by that same
    fraction. Per tensor is our reading for segmentation, where a deep backbone's tensors differ in gradient scale
    by orders of magnitude and a global cut could freeze whole layers (the new decoder head, say). To get the
    authors' treatment of biases, pass only the weight tensors (``p.dim() in (2, 4)``).

    Other readings: with momentum, a non-key parameter still moves by its momentum buffer for a few steps (the
    optimizer is not touched); ties at the cut are broken by ``torch.topk``; parameters whose ``.grad`` is None
    are skipped (frozen layers, unused branches). Gradient scaling (AMP) does not change the ranking.
    """

    def __init__(self, key_fraction: float = 0.4) -> None:
        if not 0.0 < key_fraction <= 1.0:
            raise ValueError(f"key_fraction must be in (0, 1], got {key_fraction}")
        self.key_fraction = key_fraction

    def num_kept(self, numel: int) -> int:
        """How many entries of a tensor with ``numel`` elements stay critical: max(1, floor(K·numel))."""
        # The 1e-9 absorbs float error in K·numel: 0.29·100 evaluates to 28.999999999999996, which floors to 28, not 29.
        return min(numel, max(1, math.floor(self.key_fraction * numel + 1e-9)))

    @torch.no_grad()
    def apply(self, parameters: Iterable[nn.Parameter]) -> float:
        """Zero the loss gradient of every non-critical entry in place; return the fraction of entries kept.

        ``g = |grad ⊙ w|`` is computed in float32 per tensor; the ``num_kept(numel)`` largest entries keep their
        gradient, the others get 0. The returned fraction is over all entries that had a gradient (1.0 when
        none had).
        """
        kept = 0
        total = 0
        for param in parameters:
            grad = param.grad
            if grad is None:
                continue
            numel = grad.numel()
            if numel == 0:
                continue
            k = self.num_kept(numel)
            if k < numel:
                importance = (grad.float() * param.float()).abs().flatten()
                critical = torch.zeros(numel, dtype=torch.bool, device=grad.device)
                critical[importance.topk(k, sorted=False).indices] = True
                grad.masked_fill_(~critical.view(grad.shape), 0)
            kept += k
            total += numel
        return kept / total if total else 1.0


def noise_aware_loss(logits: torch.Tensor, features: torch.Tensor, classifier_weight: torch.Tensor,
                     y_crf: torch.Tensor, y_ret: torch.Tensor, gamma: float = 7.0,
                     lambda_wce: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    * σ is detached. The paper is silent on this: it calls σ "a confidence map" that gives "the likelihood of each
      label being correct" and "exploit[s] the confidence map as a weighting factor" in Eq. 13; it never says
      whether gradients flow through it. We treat a weight as a weight: otherwise the loss could be lowered by
      pulling φ away from W_{c*} (shrinking σ of hard pixels) instead of by fitting the label. Note that the
      authors' released code (cvlab-yonsei/BANA, ``stage3_vgg.py``) does *not* detach σ there.
    * Empty S or ~S contributes 0 (not NaN); a pixel that Y_crf ignores (255) is in neither set.

    Args:
        logits: (N, C, H, W) segmentation scores at label resolution.
        features: (N, D, h, w) φ, the features fed to the final classifier.
        classifier_weight: (C, D) W (a (C, D, 1, 1) conv weight is accepted too).
        y_crf: (N, H, W) int64 Y_crf, 255 = ignore; its label is c*.
        y_ret: (N, H, W) int64 Y_ret, 255 = no retrieval label.
        gamma: damping γ ≥ 1 (BANA: 7).
        lambda_wce: λ, the weight of L_wce (BANA: 0.1).

    Returns:
        (L, terms) with terms "ce" (L_ce), "wce" (L_wce) and "agree_fraction" (|S| / pixels labelled in Y_crf, 0 if
        none), all detached.
    """
    _check_label_map(logits, y_crf, "y_crf")
    _check_label_map(logits, y_ret, "y_ret")
    num_classes = logits.shape[1]
    if features.dim() != 4 or features.shape[0] != logits.shape[0]:
        raise ValueError(f"features must be (N, D, h, w) with N = {logits.shape[0]}, got {tuple(features.shape)}")
    weight = classifier_weight.flatten(1)
    if tuple(weight.shape) != (num_classes, features.shape[1]):
        raise ValueError(f"classifier_weight must be (C, D) = {(num_classes, features.shape[1])}, "
                         f"got {tuple(classifier_weight.shape)}")

    _, log_h_star, labelled = _pixel_log_probs(logits, y_crf)
    y_crf = y_crf.long()
    agree = labelled & (y_crf == y_ret.long())
    disagree = labelled & ~agree
    loss_ce = _masked_mean(-log_h_star, agree)

    with torch.no_grad():
        # Weight only (detached, see docstring): cos(φ, W_c) at feature resolution, then resized like the logits.
        cos = torch.einsum("ndhw,cd->nchw", F.normalize(_upcast(features), dim=1), F.normalize(_upcast(weight), dim=1))
        cos = F.interpolate(cos, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        correlation = 1.0 + cos  # D_c ∈ [0, 2]
        safe_crf = torch.where(labelled, y_crf, torch.zeros_like(y_crf))
        d_star = correlation.gather(1, safe_crf.unsqueeze(1)).squeeze(1)
        # D ≥ 0, and max_c D_c = 0 would need every W_c antiparallel to φ; the floor only avoids 0/0.
        sigma = (d_star / correlation.amax(dim=1).clamp_min(1e-12)) ** gamma
        sigma = torch.where(disagree, sigma, torch.zeros_like(sigma))
        sigma_sum = sigma.sum()
        sigma_norm = torch.where(sigma_sum > 0, sigma_sum, torch.ones_like(sigma_sum))
    weighted = torch.where(disagree, sigma * -log_h_star, torch.zeros_like(log_h_star))
    loss_wce = weighted.sum() / sigma_norm
    loss = loss_ce + lambda_wce * loss_wce

    agree_fraction = agree.sum().float() / labelled.sum().clamp_min(1).float()
    terms = {"ce": loss_ce.detach(), "wce": loss_wce.detach(), "agree_fraction": agree_fraction.detach()}
    return loss, terms


def mspn_hybrid_loss(logits: torch.Tensor, majority: torch.Tensor, agreement: torch.Tensor, proposed: torch.Tensor,
                     present: torch.Tensor, agreement_threshold: int = 4, negative_weight: float = 1.0,
                     indirect_weight: float = 1.0,
                     constraint_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSPN positive-negative hybrid learning on multi-seed votes: ``L = L_pos + w_neg·L_neg + w_ind·L_ind +
    w_pc·L_pc``.

    Our reading — the MSPN paper body is an illegible OCR; only its English abstract survives ("negative learning
    for error suppression", "indirect negative learning ... the input image does not belong to its complementary
    labels", "a prediction constraint loss" against over-confidence on noisy labels). We implement exactly this:

    * Pixel sets, from the seeds' votes. clean = agreement ≥ t and majority ≠ 255; unknown = majority = 255,
      agreement = 0 and no label proposed (crop padding, or every seed abstained), excluded from every term;
      noisy = neither clean nor unknown.
    * ``L_pos`` = CE on the majority label, mean over clean pixels (positive learning).
    * ``L_neg`` = mean over (noisy pixel, class c ∉ present) pairs of ``−log(1 − p_c)``: negative learning
      (NLNL, Kim et al. ICCV 2019) on labels judged wrong because the image tags rule them out.
    * ``L_ind`` = mean over (noisy pixel, class c ∈ present, c not proposed by any seed at the pixel) pairs of
      ``−log(1 − p_c)``: indirect negative learning on complementary labels (NLNL / JNPL).
    * ``L_pc`` = mean over noisy pixels of ``Σ_c p_c log p_c`` (negative entropy): a confidence penalty
      (Pereyra et al. 2017) as the prediction constraint; minimising it keeps noisy pixels from becoming
      over-confident.
    * ``1 − p_c`` is floored at 1e-6 inside the log; an empty set contributes exactly 0 with a gradient path.

    Args:
        logits: (N, C, H, W) segmentation scores.
        majority: (N, H, W) int64 majority label of the seeds, 255 where every seed abstained.
        agreement: (N, H, W) int64 number of seeds that voted for ``majority``.
        proposed: (N, C, H, W) bool, label c was proposed by at least one seed at the pixel.
        present: (N, C) bool, the image's label set (background + image tags).
        agreement_threshold: t, the votes needed for a clean label (MSPN: t ∈ {3, 4, 5, 6} of 6 seeds).
        negative_weight: w_neg.
        indirect_weight: w_ind.
        constraint_weight: w_pc.

    Returns:
        (L, terms) with terms "pos", "neg", "indirect", "constraint" and "clean_fraction" (clean pixels / pixels
        that are not unknown, 0 if none), all detached.
    """
    _check_label_map(logits, majority, "majority")
    _check_label_map(logits, agreement, "agreement")
    if tuple(proposed.shape) != tuple(logits.shape):
        raise ValueError(f"proposed must be (N, C, H, W) = {tuple(logits.shape)}, got {tuple(proposed.shape)}")
    if tuple(present.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"present must be (N, C) = {tuple(logits.shape[:2])}, got {tuple(present.shape)}")
    if agreement_threshold < 1:
        raise ValueError(f"agreement_threshold must be >= 1, got {agreement_threshold}")

    log_p, log_p_major, has_major = _pixel_log_probs(logits, majority)
    p = log_p.exp()
    proposed = proposed.bool()
    present = present.bool()

    clean = has_major & (agreement >= agreement_threshold)
    unknown = ~has_major & (agreement == 0) & ~proposed.any(dim=1)
    noisy = ~clean & ~unknown

    loss_pos = _masked_mean(-log_p_major, clean)

    neg_log = -torch.log((1.0 - p).clamp_min(_ONE_MINUS_P_MIN))  # −log(1 − p_c), (N, C, H, W)
    noisy_c = noisy.unsqueeze(1)
    present_c = present[:, :, None, None]
    loss_neg = _masked_mean(neg_log, noisy_c & ~present_c)
    loss_ind = _masked_mean(neg_log, noisy_c & present_c & ~proposed)

    # p·log p with log-softmax (finite even where p underflows to 0, where the product is then 0).
    neg_entropy = (p * log_p).sum(dim=1)
    loss_pc = _masked_mean(neg_entropy, noisy)

    loss = loss_pos + negative_weight * loss_neg + indirect_weight * loss_ind + constraint_weight * loss_pc
    clean_fraction = clean.sum().float() / (~unknown).sum().clamp_min(1).float()
    terms = {"pos": loss_pos.detach(), "neg": loss_neg.detach(), "indirect": loss_ind.detach(),
             "constraint": loss_pc.detach(), "clean_fraction": clean_fraction.detach()}
    return loss, terms


def decode_proposed(bits: torch.Tensor, label_lists: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unpack MSPN's per-pixel proposal bitmask into ``proposed`` (N, C, H, W) bool.

    Bit k of ``bits[n, h, w]`` set means the k-th label of image n's label list, ``label_lists[n, k]``, was
    proposed by at least one seed at that pixel; 0 = nothing proposed. A uint8 mask holds 8 labels per image
    (background + 7 tags); the caller pads ``label_lists`` with -1, and a set bit on a -1 slot is ignored.

    Args:
        bits: (N, H, W) uint8 or int64 bitmask.
        label_lists: (N, K) int64 class ids, K ≤ 8 for uint8 bits (≤ 63 for int64), padded with -1.
        num_classes: C.

    Returns:
        (N, C, H, W) bool on ``bits``' device.
    """
    if bits.dim() != 3:
        raise ValueError(f"bits must be (N, H, W), got shape {tuple(bits.shape)}")
    if label_lists.dim() != 2 or label_lists.shape[0] != bits.shape[0]:
        raise ValueError(f"label_lists must be (N, K) with N = {bits.shape[0]}, got {tuple(label_lists.shape)}")
    num_slots = label_lists.shape[1]
    capacity = 8 if bits.dtype == torch.uint8 else 63
    if num_slots > capacity:
        raise ValueError(f"label_lists has {num_slots} slots but {bits.dtype} bits hold at most {capacity}")
    label_lists = label_lists.to(device=bits.device, dtype=torch.int64)
    if ((label_lists < -1) | (label_lists >= num_classes)).any():
        raise ValueError(f"label_lists must hold class ids in [0, {num_classes}) or -1 padding")

    n, h, w = bits.shape
    bits = bits.to(torch.int64)
    proposed = torch.zeros((n, num_classes, h, w), dtype=torch.bool, device=bits.device)
    classes = torch.arange(num_classes, device=bits.device)
    for slot in range(num_slots):
        is_set = ((bits >> slot) & 1).bool()  # (N, H, W)
        # (N, C) one-hot of this slot's class id; all False for -1 padding.
        slot_class = label_lists[:, slot, None] == classes
        proposed |= is_set[:, None] & slot_class[:, :, None, None]
    return proposed
