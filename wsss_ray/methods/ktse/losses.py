"""KTSE's classifier objective (Chen et al. ECCV 2024, Sec. 3.2-3.5): knowledge transfer with simulated
inter-image erasing.

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
train L_cls alone (``warmup_epochs``; the trainer calls :meth:`KtseObjective.set_epoch`); half of the batch forms
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
from torch import nn

from wsss_ray.methods.base import ClassifierObjective
from wsss_ray.methods.ktse.config import KtseLossConfig
from wsss_ray.methods.ktse.ssr import (
    NORMS,
    anchor_cam,
    foreground_mask,
    inter_class_loss,
    present_peak,
    rectified_up,
    split_cross_entropy,
    ssr_cross_entropy,
    ssr_pseudo_label,
)

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

def _resize(features: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class KtseObjective(ClassifierObjective):
    """KTSE's training loss for a classifier with ``.backbone`` (images → features) and a KtseHead ``.head``.

    ``__call__(model, batch)`` runs every forward pass it needs (anchor; synthetic with SIE; masked with MGA)
    and returns ``(L, terms)`` with the detached terms "cls", "kt", "ce", "inter", "global", "local" (those
    switched off are absent; "inter" is reported before its λ_inter weight). Before ``warmup_epochs`` (the
    trainer reports the epoch through :meth:`set_epoch`), and with every switch off, L is the plain multi-label
    soft margin loss of the head's logits and only the anchor's forward pass runs. Losses are computed in float32
    from the CAM features, so the call is safe under bf16 autocast.
    """

    def __init__(self, config: KtseLossConfig, head_config: object = None) -> None:
        super().__init__()
        self.config = config
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch about to run (the trainer calls it, like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                    dict[str, torch.Tensor]]:
        images = batch["image"]
        target = batch["target"].float()
        f_a = model.head.cam_features(model.backbone(images))
        terms = {"cls": F.multilabel_soft_margin_loss(model.head.pool(f_a).float(), target)}
        if self.epoch >= self.config.warmup_epochs:
            terms.update(self._regularisers(model, images, target > 0.5, f_a.float()))
        total = terms["cls"]
        for name, value in terms.items():
            if name != "cls":
                total = total + (self.config.lambda_inter if name == "inter" else 1.0) * value
        return total, {name: value.detach() for name, value in terms.items()}

    def _regularisers(self, model: nn.Module, images: torch.Tensor, present: torch.Tensor,
                      f_a: torch.Tensor) -> dict[str, torch.Tensor]:
        config, size = self.config, images.shape[-2:]
        # The upsampled, normalised anchor CAM: Ŷ and M^f (at input resolution) and MGA's erasing all read it.
        cam_input = anchor_cam(f_a[:, 1:], size)
        terms: dict[str, torch.Tensor] = {}
        label = None
        if config.ssr:
            label, terms["ce"], terms["inter"] = self._ssr(f_a, present, cam_input)
        if config.sie:
            terms["kt"], synthetic_ce = self._sie(model, images, present, f_a, label)
            if synthetic_ce is not None:
                # Sec. 3.3: Ŷ also supervises the simulated branch (authors: its own, unsplit CE).
                terms["ce"] = terms["ce"] + synthetic_ce
        if config.mga:
            terms["global"], terms["local"] = self._mga(model, images, present, f_a[:, 1:], cam_input)
        return terms

    def _ssr(self, f_a: torch.Tensor, present: torch.Tensor,
             cam_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ŷ, L_ce and L_inter of the anchor, at the crop's resolution or (former reading) the feature map's."""
        config = self.config
        on_input = config.ce_resolution == "input"
        cam = cam_input if on_input else anchor_cam(f_a[:, 1:], None)
        logits = rectified_up(f_a, cam.shape[-2:]) if on_input else f_a
        # Ŷ from Eq. 1's A (authors' refine_cams_with_bkg_v2 too); M^f below from the min-max CAM (authors). At
        # the crop's resolution the foreground channels of ``logits`` are already up(ReLU(F)): normalise those.
        if config.label_norm == "min_max":
            label_cam = cam
        elif on_input:
            label_cam = NORMS[config.label_norm](logits[:, 1:].detach())
        else:
            label_cam = anchor_cam(f_a[:, 1:], None, config.label_norm)
        label = ssr_pseudo_label(label_cam, present, config.beta_h, config.beta_l)
        ce = ssr_cross_entropy(logits, label, present, config.omega_fg, config.fg_weighting)
        # L_inter's maps: the CE's up(ReLU(F)) (authors), or features its own ReLU may or may not rectify.
        inter_maps = (logits if config.inter_on_relu else _resize(f_a, cam.shape[-2:])) if on_input else f_a
        mask = foreground_mask(present_peak(cam, present), config.beta_o)
        inter = inter_class_loss(inter_maps[:, 1:], present, mask, channels=config.inter_channels,
                                 detach_max=config.inter_detach_max, on_relu=config.inter_on_relu)
        return label, ce, inter

    def _sie(self, model: nn.Module, images: torch.Tensor, present: torch.Tensor, f_a: torch.Tensor,
             label: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L_kt, and the synthetic image's CE against the stacked Ŷ (None without SSR)."""
        config, concat = self.config, self.config.sie_concat
        count = sie_count(images.shape[0], config.sie_fraction)
        synthetic = stack_pairs(images, count, concat)
        f_s = model.head.cam_features(model.backbone(synthetic)).float()
        big, size = synthetic.shape[-2:], images.shape[-2:]
        # The reference is the two images' own CAMs stacked at feature resolution, then upsampled (authors).
        reference = rectified_up(stack_pairs(f_a[:, 1:], count, concat), big)
        simulated = rectified_up(f_s[:, 1:], big)
        union = present[:count] | partner(present, spatial=False)[:count]
        if not config.sie_both_halves:
            reference, simulated = anchor_half(reference, size, concat), anchor_half(simulated, size, concat)
            union = present[:count]
        kt = simulated_erasing_loss(reference, simulated, union, config.margin, config.alignment_reduction)
        if label is None:
            return kt, None
        label_s = stack_pairs(label, count, concat)
        logits_s = (rectified_up if config.ce_resolution == "input" else _resize)(f_s, label_s.shape[-2:])
        if not config.sie_both_halves:
            logits_s, label_s = (anchor_half(x, label.shape[-2:], concat) for x in (logits_s, label_s))
        if config.fg_weighting == "simple_only":
            every = torch.ones(count, dtype=torch.bool, device=label.device)
            return kt, split_cross_entropy(logits_s, label_s, every, config.omega_fg)
        return kt, ssr_cross_entropy(logits_s, label_s, union, config.omega_fg, config.fg_weighting)

    def _mga(self, model: nn.Module, images: torch.Tensor, present: torch.Tensor, fg_a: torch.Tensor,
             cam_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L_global and L_local between the anchor and the branch whose discriminative region was erased."""
        config, size = self.config, images.shape[-2:]
        keep = erase_keep_mask(present_peak(cam_input, present), config.erase_threshold)
        fg_m = model.head.cam_features(model.backbone(images * keep.to(images.dtype))).float()[:, 1:]
        global_ = global_alignment(fg_a, fg_m, present, config.alignment_reduction)
        local = local_alignment(_resize(fg_m, size), _resize(fg_a, size), present,
                                keep if config.local_on_kept else None, config.local_scale, config.margin,
                                config.alignment_reduction)
        return global_, local
