"""KTSE's classifier objective (Chen et al. ECCV 2024, Sec. 3.2-3.5): knowledge transfer with simulated
inter-image erasing.

    L = L_cls + L_kt + L_global + L_local + L_ce + λ_inter·L_inter                               (Eq. 10)

- L_cls (Eq. 2): multi-label soft margin on the anchor's GPP logits q (the "base" row of Table 6).
- SIE (Sec. 3.2): the anchor is concatenated side by side with a paired image, without resizing; the anchor
  half of the synthetic image's CAM features F_s should activate as much as the anchor alone:
  L_kt = ReLU(F̂_a − F̂_s) (Eq. 3), F̂ = CFE(F, y) the channels of the classes present in the image.
- SSR (Sec. 3.3): a pseudo-label Ŷ from the anchor's own CAM (Eq. 4) supervises F_a (and the anchor half of
  F_s) with a cross-entropy whose foreground pixels are discounted by ω_fg (Eq. 5); an inter-class loss
  widens the gap between the largest and second-largest class activation on foreground pixels (Eq. 6-7).
- MGA (Sec. 3.4): the anchor's most discriminative region (normalised CAM above 0.6) is erased and the
  masked branch F_m is aligned with the anchor globally, |GAP(ReLU(F̂_a)) − GAP(ReLU(F̂_m))| (Eq. 8), and
  locally, ReLU(F̂_m − F̂_a) (Eq. 9).

The maths lives in small pure functions over CAM-feature tensors (N first); :class:`KtseObjective` runs the
branches' forward passes and adds the terms. Choices where the paper is silent are stated as "our reading"
in the docstrings; the main ones:

- No branch is detached: the paper calls SIE's transfer bidirectional and says cutting the anchor's gradient
  makes training unstable (Sec. 3.3), which is what SSR exists to compensate; MGA's losses follow AEFT's
  attraction loss, which does not detach either.
- CFE keeps the present foreground classes (the image-level label y has no background entry); the alignment
  losses are means over present-class channels and pixels, so images with more classes do not weigh more.
- The synthetic image gets no classification loss: Eq. 10 has only the anchor's L_cls, and the paper uses Ŷ
  (not the union of labels) to supervise the simulated branch.
- The pixel-adaptive refinement (PAR) of Ŷ is not applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.core.pixel_losses import global_mean
from wsss_ray.methods.ktse.config import KtseLossConfig

# Floor of a CAM's peak in the max-normalisation (Eq. 1): a class with no positive activation maps to zeros.
_EPS = 1e-5


def normalized_cam(features: torch.Tensor) -> torch.Tensor:
    """A^c = ReLU(F^c) / max(F^c) (Eq. 1), per image and channel of (N, K, h, w) features; values in [0, 1]."""
    activation = F.relu(features)
    peak = activation.flatten(2).amax(2).clamp_min(_EPS)
    return activation / peak[:, :, None, None]


def _present_peak(cam: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """max_c A^c over the present classes (N, h, w) of a non-negative CAM (N, C, h, w); 0 where none is present."""
    return (cam * present[:, :, None, None].to(cam.dtype)).amax(1)


def _present_mean(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of (N, C, h, w) values over the present classes' channels (CFE) and all their pixels.

    With no class present it is 0 and still depends on ``values`` (a gradient path that keeps DDP in step);
    the count is clamped rather than tested so that no host-device sync happens on CUDA.
    """
    mask = present[:, :, None, None].to(values.dtype)
    count = present.sum() * values.shape[-2] * values.shape[-1]
    return global_mean((values * mask).sum(), count)


def simulated_pair(images: torch.Tensor) -> torch.Tensor:
    """SIE's synthetic images (N, 3, H, 2W): anchor i on the left, image (i+1) mod N on the right, no resize.

    Our reading for a batch of one: the partner is the anchor's mirror image, so the synthetic image still
    carries extra discriminative object information at the anchor's scale.
    """
    partner = images.flip(-1) if images.shape[0] == 1 else images.roll(-1, dims=0)
    return torch.cat([images, partner], dim=-1)


def simulated_erasing_loss(f_a: torch.Tensor, f_s: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """L_kt = ReLU(F̂_a − F̂_s) (Eq. 3), averaged over present classes and pixels.

    ``f_a``: anchor foreground CAM features (N, C, h, w); ``f_s``: the anchor half of the synthetic image's
    foreground CAM features, same shape; ``present``: (N, C) bool. Only where the anchor alone activates more
    than its copy inside the synthetic image is there a loss (the ReLU), so the transfer targets the object
    regions the paired image made less active. Gradients reach both branches (the paper's bidirectional
    alignment).
    """
    return _present_mean(F.relu(f_a - f_s), present)


def ssr_pseudo_label(features: torch.Tensor, present: torch.Tensor, beta_h: float, beta_l: float) -> torch.Tensor:
    """Ŷ (N, h, w) long of Eq. 4 from the anchor's C+1-channel CAM features F (N, C+1, h, w).

    Ŷ = argmax_c F_c where max_c A^c ≥ β_h, 0 (background) where max_c A^c ≤ β_l, 255 otherwise, with A the
    max-normalised CAM (Eq. 1). Our reading: both the max over A and the argmax over F run over the present
    foreground classes, since an absent class's max-normalised CAM reaches 1 somewhere by construction, and Eq. 4
    labels *confident foreground* there. The background channel must not take part in the argmax: it is trained
    only by this CE, so once it wins a pixel it labels that pixel background, learns from it, and wins more —
    on the generated data every pixel was background after one epoch (bench/classifier_quality.py). An image
    with no present class is all background. No gradient: Ŷ is a target.
    """
    with torch.no_grad():
        foreground = features[:, 1:]
        peak = _present_peak(normalized_cam(foreground), present)
        label = foreground.masked_fill(~present[:, :, None, None], float("-inf")).argmax(1) + 1
        background = torch.zeros_like(label)
        ignore = torch.full_like(label, IGNORE_LABEL)
        return torch.where(peak >= beta_h, label, torch.where(peak <= beta_l, background, ignore))


def ssr_cross_entropy(features: torch.Tensor, label: torch.Tensor, present: torch.Tensor,
                      omega_fg: float) -> torch.Tensor:
    """L_ce of Eq. 5: softmax cross-entropy of F (N, C+1, h, w) against Ŷ (N, h, w), foreground discounted.

    L_ce = −Σ_c Ŷ_bg^c log Γ(F)^c + ω_fg Ŷ_fg^c log Γ(F)^c, summed over labelled pixels and divided by their
    number (255 ignored). Our reading of ω_fg: it discounts the foreground pixels of *complex* images (two or
    more present classes), whose foreground pseudo-labels the paper calls noisy; simple images keep weight 1
    ("SSR treats simple and complex images differently"). Background pixels always weigh 1. Every pixel
    ignored → 0 with a gradient path.
    """
    # Upcast half precision (bf16 autocast) but keep float64, so the loss is exact enough for gradcheck.
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    labelled = label != IGNORE_LABEL
    nll = F.cross_entropy(features, label.long(), ignore_index=IGNORE_LABEL, reduction="none")
    complex_image = present.sum(1) >= 2
    fg_weight = 1.0 + (omega_fg - 1.0) * complex_image.to(nll.dtype)
    weight = torch.where(label == 0, torch.ones_like(nll), fg_weight[:, None, None].expand_as(nll))
    weight = weight * labelled.to(nll.dtype)
    return global_mean((weight * nll).sum(), labelled.sum())


def foreground_mask(f_fg: torch.Tensor, present: torch.Tensor, beta_o: float) -> torch.Tensor:
    """M^f (N, h, w) bool of Eq. 6: pixels whose max-normalised CAM over the present classes is ≥ β_o."""
    with torch.no_grad():
        return _present_peak(normalized_cam(f_fg), present) >= beta_o


def inter_class_loss(f_fg: torch.Tensor, present: torch.Tensor, fg_mask: torch.Tensor) -> torch.Tensor:
    """L_inter = Σ (V^2nd − V^max)·M^f / |M^f| (Eq. 6-7) on foreground CAM features (N, C, h, w).

    V^max and V^2nd are the largest and second-largest activation along the channel dimension (Eq. 7);
    minimising their difference makes each foreground pixel's class activation exclusive. β_o is not a
    margin: it is the threshold of M^f (:func:`foreground_mask`); the loss is the paper's unbounded form,
    kept small by λ_inter = 0.005. Our reading: the channels are the present foreground classes (the loss is
    about boundaries between foreground objects), and only complex images (≥ 2 present classes) contribute,
    as the paper designs it "for the multiple foreground classes in complex images"; |M^f| counts their
    foreground pixels over the batch. No such pixel → 0 with a gradient path.
    """
    if f_fg.shape[1] < 2:
        return f_fg.sum() * 0.0
    mask = fg_mask & (present.sum(1) >= 2)[:, None, None]
    top2 = f_fg.masked_fill(~present[:, :, None, None], float("-inf")).topk(2, dim=1).values
    # Images with fewer than two present classes have V^2nd = −inf; ``where`` drops them (and their gradient).
    gap = torch.where(mask, top2[:, 1] - top2[:, 0], torch.zeros_like(top2[:, 0]))
    return global_mean(gap.sum(), mask.sum())


def erase_keep_mask(f_fg: torch.Tensor, present: torch.Tensor, size: tuple[int, int] | torch.Size,
                    threshold: float) -> torch.Tensor:
    """MGA's erasing mask (N, 1, H, W): 0 on the most discriminative region, 1 elsewhere.

    The ReLU'd foreground CAM features are upsampled (bilinear) to the image size and max-normalised per
    class (Eq. 1), and a pixel is erased where the largest present-class value exceeds ``threshold`` (0.6,
    following AEFT). Our reading: hard erasing only, as KTSE describes it (AEFT also scales the remaining
    pixels by the CAM); erased pixels become 0 in the normalised image, i.e. the dataset's mean colour.
    No gradient: the mask selects an input.
    """
    with torch.no_grad():
        cam = F.interpolate(F.relu(f_fg.float()), size=tuple(size), mode="bilinear", align_corners=False)
        peak = _present_peak(normalized_cam(cam), present)
        return (peak <= threshold).unsqueeze(1).to(f_fg.dtype)


def global_alignment(f_a: torch.Tensor, f_m: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """L_global = |GAP(ReLU(F̂_a)) − GAP(ReLU(F̂_m))| (Eq. 8), averaged over the present classes (N, C).

    Eq. 8 writes a bare difference; our reading is the L1 distance of AEFT's attraction loss, which this term
    replaces (Table 7), so each class confidence of the masked branch is pulled to the anchor's and back.
    """
    confidence_a = F.relu(f_a).mean((2, 3))
    confidence_m = F.relu(f_m).mean((2, 3))
    mask = present.to(confidence_a.dtype)
    return global_mean(((confidence_a - confidence_m).abs() * mask).sum(), present.sum())


def local_alignment(f_m: torch.Tensor, f_a: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """L_local = ReLU(F̂_m − F̂_a) (Eq. 9), averaged over present classes and pixels.

    Where the erased image activates more than the anchor, the anchor learns the newly found object parts,
    and the masked branch learns from the anchor's low activations not to spread into background.
    """
    return _present_mean(F.relu(f_m - f_a), present)


class KtseObjective(nn.Module):
    """KTSE's training loss for a classifier with ``.backbone`` (images → features) and a KtseHead ``.head``.

    ``__call__(model, batch)`` runs every forward pass it needs (anchor; synthetic with SIE; masked with MGA)
    and returns ``(L, terms)`` with the detached terms "cls", "kt", "ce", "inter", "global", "local" (those
    switched off are absent; "inter" is reported before its λ_inter weight). With every switch off, L is
    the plain multi-label soft margin loss of the head's logits (Table 6's base row). Losses are computed in
    float32 from the CAM features, so the call is safe under bf16 autocast.
    """

    def __init__(self, config: KtseLossConfig, head_config: object = None) -> None:
        super().__init__()
        self.config = config

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                    dict[str, torch.Tensor]]:
        config = self.config
        images = batch["image"]
        target = batch["target"].float()
        present = target > 0.5
        backbone, head = model.backbone, model.head

        f_a = head.cam_features(backbone(images))
        terms = {"cls": F.multilabel_soft_margin_loss(head.pool(f_a).float(), target)}
        f_a = f_a.float()
        fg_a = f_a[:, 1:]

        f_s = None
        if config.sie:
            # No resize (Sec. 3.2): the anchor half of the synthetic features is the first w columns.
            f_s = head.cam_features(backbone(simulated_pair(images))).float()[..., : f_a.shape[-1]]
            terms["kt"] = simulated_erasing_loss(fg_a, f_s[:, 1:], present)

        if config.ssr:
            label = ssr_pseudo_label(f_a.detach(), present, config.beta_h, config.beta_l)
            ce = ssr_cross_entropy(f_a, label, present, config.omega_fg)
            if f_s is not None:
                # Sec. 3.3: the anchor's Ŷ also supervises the simulated branch (its anchor half).
                ce = ce + ssr_cross_entropy(f_s, label, present, config.omega_fg)
            terms["ce"] = ce
            terms["inter"] = inter_class_loss(fg_a, present, foreground_mask(fg_a.detach(), present, config.beta_o))

        if config.mga:
            keep = erase_keep_mask(fg_a.detach(), present, images.shape[-2:], config.erase_threshold)
            f_m = head.cam_features(backbone(images * keep.to(images.dtype))).float()
            terms["global"] = global_alignment(fg_a, f_m[:, 1:], present)
            terms["local"] = local_alignment(f_m[:, 1:], fg_a, present)

        total = terms["cls"]
        for name, value in terms.items():
            if name != "cls":
                total = total + (config.lambda_inter if name == "inter" else 1.0) * value
        return total, {name: value.detach() for name, value in terms.items()}
