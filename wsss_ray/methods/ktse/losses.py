"""KTSE's losses (Chen et al. ECCV 2024, Sec. 3.2-3.5): knowledge transfer with simulated inter-image erasing
(the objective that sums them: :mod:`wsss_ray.methods.ktse.objective`).

    L = L_cls + L_kt + L_global + L_local + L_ce + λ_inter·L_inter                               (Eq. 10)

- L_cls (Eq. 2): multi-label soft margin on the anchor's GPP logits q (the "base" row of Table 6).
- SIE (Sec. 3.2): an anchor and a partner image are stacked without resizing; the synthetic image's CAM should
  activate as much as each image alone: L_kt = ReLU(F̂_a − F̂_s) (Eq. 3), F̂ = CFE(F, y).
- SSR (Sec. 3.3, :mod:`wsss_ray.methods.ktse.ssr`): pseudo-label CE and the inter-class loss (Eq. 4-7), on the
  anchor and on the synthetic image.
- MGA (Sec. 3.4): the anchor's most discriminative region (normalised CAM ≥ 0.6) is erased and the masked
  branch F_m is aligned with the anchor globally, |GAP(ReLU(F̂_a)) − GAP(ReLU(F̂_m))| (Eq. 8), and locally,
  ReLU(F̂_m − F̂_a) (Eq. 9), on the pixels that were kept.

Where the paper is silent the authors' code (chentao2016/KTSE, ``update``) decides: the first 10 of 40 epochs
train L_cls alone (``warmup_epochs``; the trainer calls ``set_epoch`` of :class:`~wsss_ray.methods.ktse.objective.KtseObjective`); half of the batch forms
SIE pairs stacked along the height, both halves supervised; CFE multiplies absent classes by 0 and the means run
over all C channels; L_kt and L_local have a 0.05 margin inside the ReLU (not in Eq. 3/9); the alignment maps are
compared at the crop's resolution. Nothing is detached in L_kt, L_global, L_local (the paper's bidirectional
transfer). Our remaining readings: the partner of anchor i is image (i+1) mod N of the batch (the authors load a
second batch; a batch of one pairs with its mirror image); the synthetic image has no classification loss (Eq. 10
has only the anchor's). Each former reading of ours is an option of :class:`KtseLossConfig`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["all_channels", "present"]
_CONCAT_DIM = {"height": -2, "width": -1}


def cfe_mean(values: torch.Tensor, present: torch.Tensor, reduction: Reduction = "all_channels") -> torch.Tensor:
    """Mean of (N, C, ...) values after CFE (absent classes' entries × 0).

    "all_channels" (authors): over every entry, N·C·(pixels); "present": over the present classes' entries only.
    With no class present it is 0 and still depends on ``values`` (a gradient path that keeps DDP in step); the
    count is clamped rather than tested so that no host-device sync happens on CUDA.
    """
    mask = present.reshape(*present.shape, *([1] * (values.dim() - 2))).to(values.dtype)
    masked = values * mask
    if reduction == "all_channels":
        return masked.mean()
    pixels = values[0, 0].numel()
    return masked.sum() / (present.sum() * pixels).clamp_min(1)


def sie_count(batch: int, fraction: float) -> int:
    """Number P of SIE pairs: the first ``fraction`` of the batch (authors: 4 of 8), at least one."""
    return max(1, int(batch * fraction))


def partner(x: torch.Tensor, spatial: bool = True) -> torch.Tensor:
    """Each anchor's partner: image (i+1) mod N; for a batch of one (our reading) its mirror image (``spatial``
    maps only; per-image vectors such as the tags stay the anchor's)."""
    if x.shape[0] == 1:
        return x.flip(-1) if spatial else x
    return x.roll(-1, dims=0)


def stack_pairs(x: torch.Tensor, count: int, concat: Literal["height", "width"]) -> torch.Tensor:
    """The first ``count`` anchors of (N, ..., h, w) joined with their partners along height or width, no resize:
    images → SIE's synthetic images, CAM features → the reference R, pseudo-labels → the synthetic Ŷ."""
    return torch.cat([x[:count], partner(x)[:count]], dim=_CONCAT_DIM[concat])


def anchor_half(x: torch.Tensor, size: tuple[int, int], concat: Literal["height", "width"]) -> torch.Tensor:
    """The anchor's part (first ``size`` rows or columns) of a stacked map."""
    return x[..., : size[0], :] if concat == "height" else x[..., : size[1]]


def simulated_erasing_loss(reference: torch.Tensor, synthetic: torch.Tensor, union: torch.Tensor,
                           margin: float = 0.05, reduction: Reduction = "all_channels") -> torch.Tensor:
    """L_kt = CFE-mean of ReLU(R − S − m) (Eq. 3 + the authors' margin) on non-negative maps (P, C, H, W).

    ``reference``: up(ReLU(·)) of the two images' own CAMs stacked like the synthetic image; ``synthetic``:
    up(ReLU(F_s)); ``union``: (P, C) tags of either image. Only where an image alone activates more than inside
    the synthetic image is there a loss, so the transfer targets the object regions the paired image made less
    active. Gradients reach both branches (the paper's bidirectional alignment).
    """
    return cfe_mean(F.relu(reference - synthetic - margin), union, reduction)


def erase_keep_mask(peak: torch.Tensor, threshold: float) -> torch.Tensor:
    """MGA's mask (N, 1, H, W): 1 where the present-class peak of the upsampled, normalised CAM is < threshold
    (authors: ``cam_fg < 0.6``), 0 on the most discriminative region. Hard erasing only, as KTSE describes it;
    erased pixels become 0 in the normalised image, i.e. the dataset's mean colour."""
    return (peak < threshold).unsqueeze(1)


def global_alignment(f_a: torch.Tensor, f_m: torch.Tensor, present: torch.Tensor,
                     reduction: Reduction = "all_channels") -> torch.Tensor:
    """L_global = CFE-mean of |GAP(ReLU(F_a)) − GAP(ReLU(F_m))| (Eq. 8) over (N, C), GAP at feature resolution.

    Eq. 8 writes a bare difference; the authors' code (and AEFT's attraction loss, which it replaces) use L1.
    """
    confidence_a = F.relu(f_a).mean((2, 3))
    confidence_m = F.relu(f_m).mean((2, 3))
    return cfe_mean((confidence_a - confidence_m).abs(), present, reduction)


def local_alignment(f_m: torch.Tensor, f_a: torch.Tensor, present: torch.Tensor, keep: torch.Tensor | None = None,
                    scale: float = 1.0, margin: float = 0.05, reduction: Reduction = "all_channels") -> torch.Tensor:
    """L_local = CFE-mean of ReLU(s·F_m·keep − F_a·keep − m) (Eq. 9 + the authors' margin) on raw maps (N, C, H, W).

    ``keep`` (N, 1, H, W): MGA's kept pixels (None: all). Where the erased image activates more than the anchor,
    the anchor learns the newly found object parts, and the masked branch learns from the anchor's low
    activations not to spread into background.
    """
    if keep is not None:
        keep = keep.to(f_m.dtype)
        f_m, f_a = f_m * keep, f_a * keep
    return cfe_mean(F.relu(scale * f_m - f_a - margin), present, reduction)
