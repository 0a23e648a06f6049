"""KTSE's classifier objective (Chen et al. ECCV 2024, Eq. 10): the component that runs the forward passes and
sums the terms; the terms' maths are in :mod:`wsss_ray.methods.ktse.losses` (SIE, MGA) and
:mod:`wsss_ray.methods.ktse.ssr` (SSR), with the readings where the paper is silent."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.maths.par import resize_bilinear
from wsss_ray.methods.base import ClassifierObjective
from wsss_ray.methods.ktse.config import KtseLossConfig
from wsss_ray.methods.ktse.losses import (
    anchor_half,
    erase_keep_mask,
    global_alignment,
    local_alignment,
    partner,
    sie_count,
    simulated_erasing_loss,
    stack_pairs,
)
from wsss_ray.methods.ktse.ssr import (
    NORMS,
    anchor_cam,
    foreground_mask,
    inter_class_loss,
    par_pseudo_label,
    present_peak,
    rectified_up,
    split_cross_entropy,
    ssr_cross_entropy,
    ssr_pseudo_label,
)


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

    @classmethod
    def check(cls, config: KtseLossConfig, train_cls: Any) -> None:
        """The warm-up (L_cls alone for 10 of 40 epochs) must leave epochs for the full objective."""
        if config.warmup_epochs >= train_cls.epochs:
            raise ValueError(f"loss.warmup_epochs ({config.warmup_epochs}) must be below epochs ({train_cls.epochs}):"
                             " the run would train the classification loss alone (KTSE warms up 10 of 40 epochs; "
                             "scale it)")

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
            label, terms["ce"], terms["inter"] = self._ssr(f_a, present, cam_input, images)
        if config.sie:
            terms["kt"], synthetic_ce = self._sie(model, images, present, f_a, label)
            if synthetic_ce is not None:
                # Sec. 3.3: Ŷ also supervises the simulated branch (authors: its own, unsplit CE).
                terms["ce"] = terms["ce"] + synthetic_ce
        if config.mga:
            terms["global"], terms["local"] = self._mga(model, images, present, f_a[:, 1:], cam_input)
        return terms

    def _ssr(self, f_a: torch.Tensor, present: torch.Tensor, cam_input: torch.Tensor,
             images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ŷ, L_ce and L_inter of the anchor, at the crop's resolution or (former reading) the feature map's."""
        config = self.config
        on_input = config.ce_resolution == "input"
        cam = cam_input if on_input else anchor_cam(f_a[:, 1:], None)
        logits = rectified_up(f_a, cam.shape[-2:]) if on_input else f_a
        label_cam = self._label_cam(f_a, logits, cam.shape[-2:]) if on_input else \
            anchor_cam(f_a[:, 1:], None, config.label_norm)
        if config.ssr_refine == "par":
            label = par_pseudo_label(label_cam, present, images, config.beta_h, config.beta_l, config.par)
        else:
            label = ssr_pseudo_label(label_cam, present, config.beta_h, config.beta_l)
        ce = ssr_cross_entropy(logits, label, present, config.omega_fg, config.fg_weighting)
        # L_inter's maps: the CE's up(ReLU(F)) (authors), or features its own ReLU may or may not rectify.
        inter_maps = (logits if config.inter_on_relu else resize_bilinear(f_a, cam.shape[-2:])) if on_input else f_a
        mask = foreground_mask(present_peak(cam, present), config.beta_o)
        inter = inter_class_loss(inter_maps[:, 1:], present, mask, channels=config.inter_channels,
                                 detach_max=config.inter_detach_max, on_relu=config.inter_on_relu)
        return label, ce, inter

    def _label_cam(self, f_a: torch.Tensor, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Ŷ's normalised CAM A at the crop's size. ``label_norm_at: feature`` (authors): F normalised at the
        feature map's resolution, then upsampled; ``input``: the CE's up(ReLU(F)) normalised (earlier reading).
        M^f (below) keeps the min-max CAM of the upsampled map (authors)."""
        norm = NORMS[self.config.label_norm]
        with torch.no_grad():
            if self.config.label_norm_at == "feature":
                return resize_bilinear(norm(f_a[:, 1:].detach().float()), size)
            return norm(logits[:, 1:].detach())

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
        logits_s = (rectified_up if config.ce_resolution == "input" else resize_bilinear)(f_s, label_s.shape[-2:])
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
        local = local_alignment(resize_bilinear(fg_m, size), resize_bilinear(fg_a, size), present,
                                keep if config.local_on_kept else None, config.local_scale, config.margin,
                                config.alignment_reduction)
        return global_, local
