"""CDSP segmentation-side losses (Zhang et al., "Scribble Hides Class", AAAI 2024).

The segmenter is trained with ``L = L_seg + L_lorm + L_de`` (Eq. 5):

- ``L_seg = L_segs + L_segc`` (Eq. 7): :func:`partial_cross_entropy` on the scribbled pixels ``Ω_s`` (Eq. 8)
  plus :func:`smoothed_cross_entropy` (ε = 0.1) on the CAM pseudo-label ``Ω̃`` (Eq. 9).
- ``L_lorm`` (Eqs. 10-13): :class:`LoRM`, the localization rectification module, on the backbone's feature map.
- ``L_de = L_ds + L_dc`` (Eqs. 15, 17, 18): :func:`distance_entropy_loss`, the prediction entropy weighted by the
  scribble and pseudo-label-boundary distance maps ``d_s``, ``d_c``, which the pseudo-label stage precomputes
  (:mod:`wsss_ray.methods.cdsp.distance`; stored as uint8 ``round(255·d)``, divided by 255 by the trainer).

Every loss is computed in float32 whatever the autocast dtype of its inputs (float64 stays float64, for
gradcheck), keeps the device of its inputs, and returns a zero that still has a gradient path when there is
nothing to average over, so that every DDP worker runs the same backward graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.core.pixel_losses import global_mean

__all__ = ["LoRM", "distance_entropy_loss", "partial_cross_entropy", "smoothed_cross_entropy"]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs (the losses never run in bf16)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _labelled_mean_ce(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``Σ_{i labelled} CE_i / #labelled`` over the whole batch; 0 (with a gradient path) when nothing is labelled.

    ``F.cross_entropy(reduction="mean")`` returns NaN when every pixel is ignored; dividing the summed loss by the
    clamped count gives a graph-connected 0 instead, without a host sync to test for the empty case.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits must be (N, C, H, W) and target (N, H, W); got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    target = target.long()
    total = F.cross_entropy(logits.to(_compute_dtype(logits)), target, ignore_index=IGNORE_LABEL,
                            label_smoothing=label_smoothing, reduction="sum")
    return global_mean(total, (target != IGNORE_LABEL).sum())


def partial_cross_entropy(logits: torch.Tensor, scribble: torch.Tensor) -> torch.Tensor:
    """``L_segs = 1/|Ω_s| Σ_{y_i ∈ Ω_s} −log p_{i, y_i}`` (Eq. 8): CE over the scribbled pixels only.

    Args:
        logits: ``(N, C, H, W)`` segmenter output (any float dtype; computed in float32).
        scribble: ``(N, H, W)`` int64 class ids on scribbled pixels, 255 (``IGNORE_LABEL``) elsewhere.

    Returns:
        Scalar; ``|Ω_s|`` is counted over the whole batch (our reading: the paper writes one image). No scribbled
        pixel in the batch → 0 with a gradient path.
    """
    return _labelled_mean_ce(logits, scribble, 0.0)


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """``L_segc = 1/|Ω̃| Σ_{y_i ∈ Ω̃} [(1−ε)·c(y_i, p_i) + ε·c(1/K, p_i)]`` (Eq. 9), ``c(y, p) = −Σ_k y_k log p_k``.

    That is PyTorch's ``label_smoothing=ε`` (target ``(1−ε)·onehot + ε/K``) averaged over the labelled pixels of
    the pseudo-label, 255 ignored, over the whole batch.

    Args:
        logits: ``(N, C, H, W)``; ``K = C``.
        target: ``(N, H, W)`` pseudo-label, 255 = ignored.
        label_smoothing: ε in [0, 1]; the paper uses 0.1.

    Returns:
        Scalar; 0 with a gradient path when no pixel is labelled.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return _labelled_mean_ce(logits, target, label_smoothing)


class LoRM(nn.Module):
    """Localization rectification module (Eqs. 10-13): ``L_lorm = MSE(F, F̂)`` over foreground positions.

    With ``F`` the ``(D, hw)`` flattened feature map, ``Q = W_Q F``, ``K = W_K F`` (1×1 convs to ``channels``):

    - ``A_ij = softmax_j(cos(Q_i, K_j))`` (Eq. 10), a row softmax over all ``hw`` positions; ``A`` is ``hw × hw``.
    - ``A'_ij = M_j · A_ij`` (Eq. 11), ``M`` the flattened foreground mask of the pseudo-label. The mask
      multiplies the **columns** (the key/source axis ``j``): Eq. 11 broadcasts a length-``hw`` vector against
      ``A``, which scales the last axis, and the paper says the *background features in each row* ``A_i`` are
      suppressed, i.e. position ``i`` may only borrow from foreground positions. The row is not renormalised
      (the paper does not), so ``Σ_j A'_ij ≤ 1``; the learnable ``δ`` can rescale.
    - ``F̂_i = δ · Σ_j A'_ij F_j`` (Eq. 12). Our reading of the orientation: in the paper's ``(D, hw)`` layout this
      is ``F̂ = δ·F·A'ᵀ``; the literal ``F·A'`` would weight ``F_j`` by column ``i`` of ``A'``, which is neither
      a distribution over sources nor masked at the sources. The transpose is what the text describes ("the i-th
      feature vector refined by referencing the feature vectors in other locations") and what the authors'
      code computes (``bmm(A', Fᵀ)``).
    - ``L_lorm = Σ_{n, i} M_i ‖F_i − F̂_i‖² / (D · Σ_{n, i} M_i)`` (Eq. 13). Our reading: the paper writes
      ``MSE(F, F̂)`` over the whole map, but the module exists to rectify *foreground* representations; at a
      background position ``F̂`` is a mix of foreground features, and matching it would drag background features
      towards the objects. So the mean runs over foreground positions (and feature channels), pooled over the
      batch: an image without foreground contributes 0, and a batch without any foreground gives 0 with a
      gradient path.

    Gradients flow into ``F`` on both sides, and into ``W_Q``, ``W_K`` and ``δ`` through ``F̂`` (nothing is
    detached). Our reading: the paper is silent, the authors' code detaches nothing, and ``W_Q``, ``W_K``, ``δ``
    are trained by this loss alone (``F̂`` feeds no other head), so a detached ``F̂`` would leave them untrained.
    The collapse ``F → 0`` that this allows is held off by ``L_seg``, which needs informative features.

    Memory and compute are ``O(N·(hw)²)`` for ``A``: apply it to the stride-8/16 backbone map (a 512² crop at
    stride 8 gives ``hw = 4096``, i.e. 64 MiB of float32 per image for ``A`` alone, several times that with the
    softmax and its backward), never at input resolution. The attention runs in float32 with autocast disabled,
    because a bf16 cosine/softmax over thousands of positions loses most of its precision.
    """

    def __init__(self, in_channels: int, channels: int = 64) -> None:
        """``in_channels`` = ``D`` of the feature map; ``channels`` = width of the query/key projections."""
        super().__init__()
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels and channels must be >= 1, got {in_channels} and {channels}")
        self.query = nn.Conv2d(in_channels, channels, kernel_size=1)
        self.key = nn.Conv2d(in_channels, channels, kernel_size=1)
        # δ of Eq. 12, "initialised with 1 to control the rectification degree".
        self.delta = nn.Parameter(torch.ones(()))

    def _project(self, conv: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
        """``(N, channels, h·w)`` projection in the features' compute dtype (weights cast, gradients kept)."""
        bias = None if conv.bias is None else conv.bias.to(features.dtype)
        return F.conv2d(features, conv.weight.to(features.dtype), bias).flatten(2)

    def forward(self, features: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """``L_lorm`` (scalar) for ``features`` ``(N, D, h, w)`` and ``foreground`` ``(N, h, w)`` in {0, 1}.

        ``foreground`` is the pseudo-label's foreground mask already at the feature map's size (the caller
        downsamples it, e.g. nearest on ``(pseudo != 0) & (pseudo != 255)``).
        """
        if features.dim() != 4 or foreground.shape != (features.shape[0], *features.shape[2:]):
            raise ValueError(f"features must be (N, D, h, w) and foreground (N, h, w); got "
                             f"{tuple(features.shape)} and {tuple(foreground.shape)}")
        dtype = _compute_dtype(features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            feats = features.to(dtype)
            mask = foreground.to(dtype).flatten(1)  # (N, hw)
            query = F.normalize(self._project(self.query, feats), dim=1, eps=1e-6)  # (N, c, hw), unit columns
            key = F.normalize(self._project(self.key, feats), dim=1, eps=1e-6)
            cosine = torch.bmm(query.transpose(1, 2), key)  # (N, hw_i, hw_j) = cos(Q_i, K_j)
            attention = cosine.softmax(dim=2) * mask[:, None, :]  # A'_ij = M_j · A_ij
            flat = feats.flatten(2)  # (N, D, hw)
            refined = self.delta.to(dtype) * torch.bmm(flat, attention.transpose(1, 2))  # F̂_i = δ Σ_j A'_ij F_j
            squared = (flat - refined).square().sum(dim=1)  # (N, hw): ‖F_i − F̂_i‖²
            count = mask.sum() * flat.shape[1]
            return global_mean((squared * mask).sum(), count)


def distance_entropy_loss(logits: torch.Tensor, dist_scribble: torch.Tensor,
                          dist_boundary: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_de = L_ds + L_dc`` (Eq. 18): prediction entropy weighted by the two distance maps.

    With ``p_i = softmax(logits_i)`` and ``H(p_i) = −Σ_c p_{i,c} log p_{i,c}``:

        ``L_ds = 1/N_s Σ_i d_s(i)·H(p_i)``  (Eq. 17),   ``L_dc = 1/N_c Σ_i d_c(i)·H(p_i)``  (Eq. 15),

    ``N_s``, ``N_c`` the numbers of non-zero weights (``d > 0``), counted over the whole batch (our reading; the
    paper writes one image).

    Sign: Eqs. 15 and 17 print ``d·p log p``, which is ``−d·H``; minimising that would *raise* the entropy, yet
    the paper's purpose is to "reinforce the prediction certainty" where the supervision is reliable (near the
    scribbles, ``d_s`` large; away from the pseudo-label's boundaries, ``d_c`` large), and the authors' code
    negates the sum. So the loss is ``+d·H``: minimising it makes predictions confident where ``d`` is large and
    leaves boundary pixels (``d_c = 0``) and pixels far from any scribble (``d_s = 0``) free.

    Args:
        logits: ``(N, C, H, W)`` segmenter output (computed in float32).
        dist_scribble: ``(N, H, W)`` ``d_s`` in [0, 1] (1 on the scribbles).
        dist_boundary: ``(N, H, W)`` ``d_c`` in [0, 1] (0 on the pseudo-label's boundaries).

    Returns:
        ``(L_de, {"ds": L_ds, "dc": L_dc})``, the terms detached (for logging). A map without non-zero weights
        gives a term of 0 with a gradient path.
    """
    expected = (logits.shape[0], *logits.shape[2:]) if logits.dim() == 4 else None
    if expected is None or dist_scribble.shape != expected or dist_boundary.shape != expected:
        raise ValueError(f"logits must be (N, C, H, W) and both distance maps (N, H, W); got {tuple(logits.shape)}, "
                         f"{tuple(dist_scribble.shape)} and {tuple(dist_boundary.shape)}")
    dtype = _compute_dtype(logits)
    log_p = F.log_softmax(logits.to(dtype), dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # (N, H, W); p = exp(log p) avoids a second softmax

    def weighted_mean(weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(dtype)
        return global_mean((weights * entropy).sum(), (weights > 0).sum())

    loss_ds = weighted_mean(dist_scribble)
    loss_dc = weighted_mean(dist_boundary)
    return loss_ds + loss_dc, {"ds": loss_ds.detach(), "dc": loss_dc.detach()}
