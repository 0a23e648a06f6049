"""KTSE's self-supervised regularisation (SSR, Sec. 3.3, Eq. 4-7) and the CAM maps KTSE's losses share.

SSR supervises the CAM features with a pseudo-label Ŷ from the anchor's own CAM: a cross-entropy whose
foreground part is discounted by ω_fg (Eq. 5), and on images with several tags an inter-class loss that widens
the gap between the largest and second-largest class activation (Eq. 6-7). Where the paper is silent the
authors' code (chentao2016/KTSE, ``get_seg_loss``) decides: the CE logits and L_inter see ReLU'd features
upsampled to the crop; background and foreground CE are two separate means and only single-tag ("simple")
images get the foreground CE; L_inter runs over all foreground channels of multi-tag ("complex") images with
V^max detached, so it bottoms out once V^2nd ≤ 0 instead of growing without bound. Ŷ is refined with PAR
(Sec. 3.3 "with the pixel-adaptive refinement module"; the code's ``refine_cams_with_bkg_v2``:
:func:`par_pseudo_label`). The other readings are options of :class:`KtseLossConfig`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from wsss_ray.core.config_base import ParConfig
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.par import downscaled, par_refine, resize_bilinear

# KTSE's max_norm offset, and the floor of L_inter's mask count (the authors' 1e-5).
EPS = 1e-5


def rectified_up(features: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """up(ReLU(F)): ReLU first, then bilinear resize (align_corners=False) of (N, K, h, w) to ``size``."""
    return F.interpolate(F.relu(features), size=tuple(size), mode="bilinear", align_corners=False)


def max_norm(maps: torch.Tensor) -> torch.Tensor:
    """KTSE's normalisation per image and channel of (N, K, h, w): x = ReLU(F), ReLU(x − min − ε)/(max − min + ε).

    For a non-negative map with min 0 this is ≈ x/max (Eq. 1); a flat map becomes 0.
    """
    x = F.relu(maps)
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return F.relu(x - low - EPS) / (high - low + EPS)


def peak_norm(maps: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per image and channel of (N, K, h, w): A = ReLU(F)/max(F), as ReLU(F)/(max ReLU(F) + ε).

    The authors' Ŷ (``refine_cams_with_bkg_v2``) divides by max + 1e-5 the same way. Unlike :func:`max_norm` a
    map that is positive everywhere keeps its floor ([2, 4] → [0.5, 1]); a map with no positive value is 0.
    """
    x = F.relu(maps)
    return x / (x.amax((2, 3), keepdim=True) + EPS)


NORMS = {"max": peak_norm, "min_max": max_norm}


def anchor_cam(f_fg: torch.Tensor, size: tuple[int, int] | torch.Size | None,
               norm: str = "min_max") -> torch.Tensor:
    """A (N, C, ·, ·): the normalised foreground CAM (``norm``: ``max`` = :func:`peak_norm`, Eq. 1; ``min_max``
    = :func:`max_norm`), upsampled to ``size`` first (None: feature resolution).

    No gradient: A only selects pixels and targets (Ŷ, M^f, MGA's erasing).
    """
    with torch.no_grad():
        f_fg = f_fg.float()
        return NORMS[norm](f_fg if size is None else rectified_up(f_fg, size))


def present_peak(cam: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """max_c A^c over the present classes (N, h, w) of a non-negative CAM (N, C, h, w); 0 where none is present."""
    return (cam * present[:, :, None, None].to(cam.dtype)).amax(1)


def ssr_pseudo_label(cam: torch.Tensor, present: torch.Tensor, beta_h: float, beta_l: float) -> torch.Tensor:
    """Ŷ (N, h, w) long of Eq. 4 from the normalised anchor CAM A (N, C, h, w) (:func:`anchor_cam`).

    With m = max over the present classes of A: Ŷ = 1 + argmax over the present classes of A where m > β_h,
    0 (background) where m ≤ β_l, 255 in between — what the authors' constant background planes at β_h and
    β_l give (an argmax tie goes to the background plane). Absent classes never vote: a max-normalised CAM
    reaches 1 somewhere by construction. An image with no present class is all background.
    """
    with torch.no_grad():
        peak = present_peak(cam, present)
        label = cam.masked_fill(~present[:, :, None, None], float("-inf")).argmax(1) + 1
        background = torch.zeros_like(label)
        ignore = torch.full_like(label, IGNORE_LABEL)
        return torch.where(peak > beta_h, label, torch.where(peak <= beta_l, background, ignore))


def par_pseudo_label(cam: torch.Tensor, present: torch.Tensor, images: torch.Tensor, beta_h: float,
                     beta_l: float, par: ParConfig) -> torch.Tensor:
    """Ŷ (N, H, W) long of Eq. 4 refined with PAR, the authors' ``refine_cams_with_bkg_v2``, from the normalised
    anchor CAM A (N, C, H, W) and the images (N, 3, ·, ·) (resized to (H, W); any normalisation, see maths.par).

    For each background plane β ∈ {β_h, β_l}: [β, A] is resized to (H, W)/``par.downscale``, soft-maxed over
    the background and the present classes (absent ones get 0), refined by PAR on the resized image, resized
    back and arg-maxed (0 = background, c = class c). Ŷ takes the β_h map's class where it is foreground,
    0 where both maps say background and 255 elsewhere. Without PAR this is :func:`ssr_pseudo_label`.
    """
    with torch.no_grad(), torch.autocast(device_type=cam.device.type, enabled=False):
        size = (cam.shape[-2], cam.shape[-1])
        small = downscaled(size, par.downscale)
        # Only background and the classes present somewhere in the batch can win: PAR runs on those channels.
        columns = torch.cat([torch.zeros(1, dtype=torch.long, device=cam.device),
                             present.any(0).nonzero().flatten() + 1])
        cam_small = resize_bilinear(cam.float(), small)
        image_small = resize_bilinear(resize_bilinear(images.float(), size), small)
        absent = ~torch.cat([torch.ones_like(present[:, :1]), present], dim=1)[:, columns]
        planes = []
        for beta in (beta_h, beta_l):
            scores = torch.cat([torch.full_like(cam_small[:, :1], beta), cam_small], dim=1)[:, columns]
            planes.append(scores.masked_fill(absent[:, :, None, None], float("-inf")).softmax(dim=1))
        # Both planes in one PAR run: PAR refines each channel on its own, over one affinity of the image.
        refined = resize_bilinear(par_refine(image_small, torch.cat(planes, dim=1), par), size)
        high, low = (columns[part.argmax(dim=1)] for part in refined.split(len(columns), dim=1))
        ignore = torch.full_like(high, IGNORE_LABEL)
        return torch.where(high != 0, high, torch.where(low == 0, torch.zeros_like(low), ignore))


def foreground_mask(peak: torch.Tensor, beta_o: float) -> torch.Tensor:
    """M^f (N, h, w) bool of Eq. 6: pixels whose present-class peak of A (:func:`present_peak`) exceeds β_o."""
    return peak > beta_o


def _float(features: torch.Tensor) -> torch.Tensor:
    # Upcast half precision (bf16 autocast) but keep float64, so the losses are exact enough for gradcheck.
    return features.to(torch.promote_types(features.dtype, torch.float32))


def split_cross_entropy(logits: torch.Tensor, label: torch.Tensor, fg_images: torch.Tensor,
                        omega_fg: float) -> torch.Tensor:
    """L_bg + ω_fg·L_fg (authors' ``get_seg_loss``/``get_seg_loss2``): two means of the pixel CE (N, K, h, w).

    L_bg: mean CE over the pixels labelled background, whole batch. L_fg: mean CE over the foreground-labelled
    pixels of the images marked in ``fg_images`` (N,) bool. An empty set contributes 0 with a gradient path.
    """
    nll = F.cross_entropy(_float(logits), label.long(), ignore_index=IGNORE_LABEL, reduction="none")
    background = (label == 0).to(nll.dtype)
    foreground = ((label != 0) & (label != IGNORE_LABEL) & fg_images[:, None, None]).to(nll.dtype)
    bg_loss = (nll * background).sum() / background.sum().clamp_min(1)
    return bg_loss + omega_fg * (nll * foreground).sum() / foreground.sum().clamp_min(1)


def discounted_cross_entropy(logits: torch.Tensor, label: torch.Tensor, present: torch.Tensor,
                             omega_fg: float) -> torch.Tensor:
    """Our former reading of Eq. 5: one mean over labelled pixels, foreground of multi-tag images weighted ω_fg."""
    nll = F.cross_entropy(_float(logits), label.long(), ignore_index=IGNORE_LABEL, reduction="none")
    labelled = label != IGNORE_LABEL
    complex_image = present.sum(1) >= 2
    fg_weight = 1.0 + (omega_fg - 1.0) * complex_image.to(nll.dtype)
    weight = torch.where(label == 0, torch.ones_like(nll), fg_weight[:, None, None].expand_as(nll))
    return (weight * labelled.to(nll.dtype) * nll).sum() / labelled.sum().clamp_min(1)


def ssr_cross_entropy(logits: torch.Tensor, label: torch.Tensor, present: torch.Tensor, omega_fg: float,
                      fg_weighting: Literal["simple_only", "discount_complex"] = "simple_only") -> torch.Tensor:
    """L_ce of Eq. 5 on the anchor: ω_fg·foreground CE of single-tag images only, or the former reading."""
    if fg_weighting == "discount_complex":
        return discounted_cross_entropy(logits, label, present, omega_fg)
    return split_cross_entropy(logits, label, present.sum(1) == 1, omega_fg)


def _second_largest(g: torch.Tensor, on_relu: bool) -> torch.Tensor:
    """V^2nd (N, h, w) along channels. On ReLU'd maps the authors' rule: zero every entry equal to the max, then
    max (a tie gives the next distinct value, or 0); on raw maps the second value of a top-2 (ties included)."""
    if on_relu:
        return g.masked_fill(g == g.amax(1, keepdim=True), 0.0).amax(1)
    return g.topk(2, dim=1).values[:, 1]


def inter_class_loss(f_fg: torch.Tensor, present: torch.Tensor, fg_mask: torch.Tensor, *,
                     channels: Literal["all", "present"] = "all", detach_max: bool = True,
                     on_relu: bool = True) -> torch.Tensor:
    """L_inter = Σ (V^2nd − sg(V^max))·M^f / (|M^f| + ε) (Eq. 6-7) over the multi-tag images of the batch.

    ``f_fg``: foreground CAM features (N, C, h, w), ReLU'd here when ``on_relu``; ``fg_mask``: M^f (N, h, w).
    Defaults are the authors': V over all C channels (absent classes included), V^max detached, so the gradient
    only lowers the runner-up class and vanishes once it is ≤ 0. Single-tag images never count ("for the
    multiple foreground classes in complex images"). No such pixel → 0 with a gradient path.
    """
    g = F.relu(_float(f_fg)) if on_relu else _float(f_fg)
    if channels == "present":
        g = g.masked_fill(~present[:, :, None, None], float("-inf"))
    if not on_relu and g.shape[1] < 2:
        return f_fg.sum() * 0.0
    mask = fg_mask & (present.sum(1) >= 2)[:, None, None]
    v_max = g.amax(1)
    v_max = v_max.detach() if detach_max else v_max
    # Pixels outside the mask (possibly ±inf with "present") are dropped by ``where``, gradient included.
    gap = torch.where(mask, _second_largest(g, on_relu) - v_max, torch.zeros_like(v_max))
    return gap.sum() / (mask.sum() + EPS)
