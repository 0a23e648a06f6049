"""MSPN's segmentation objective: positive-negative hybrid learning over the seeds' vote."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.methods.base import SegmentationObjective
from wsss_ray.methods.mspn.config import MspnLossConfig
from wsss_ray.methods.mspn.losses import decode_proposed, mspn_hybrid_loss
from wsss_ray.methods.mspn.seeds import MAX_PROPOSAL_LABELS

Terms = dict[str, torch.Tensor]


class MspnObjective(SegmentationObjective):
    """MSPN positive–negative hybrid learning over the seeds' vote (majority, agreement, proposals)."""

    maps: ClassVar[tuple[str, ...]] = ("majority", "agreement", "proposed")

    @staticmethod
    def record_fields(record: Mapping[str, Any], supervision: str) -> dict[str, Any]:
        """The image's label set, background first (the order of the proposal bits)."""
        return {"label_list": [0, *weak_tags(record, supervision)]}

    @staticmethod
    def row_fields(row: Mapping[str, Any], num_classes: int) -> dict[str, np.ndarray]:
        """What the loss reads per image besides the maps, from the training row's ``label_list`` (the image's
        label set, background first): ``label_list`` padded with -1 to the proposal bitmask's width (bit k of
        ``proposed`` stands for ``label_list[k]``) and ``present``, its (num_classes,) indicator."""
        labels = [int(v) for v in row["label_list"]]
        padded = np.full(MAX_PROPOSAL_LABELS, -1, np.int64)
        padded[:min(len(labels), MAX_PROPOSAL_LABELS)] = labels[:MAX_PROPOSAL_LABELS]
        present = np.zeros(num_classes, np.bool_)
        present[labels] = True
        return {"label_list": padded, "present": present}

    @classmethod
    def check(cls, config: MspnLossConfig, experiment: Any) -> None:
        """The agreement threshold counts the generator's seeds: it cannot exceed them."""
        seeds = experiment.pseudo_labels.generator.seeds
        if config.agreement > len(seeds):
            raise ValueError(f"train_seg.loss.agreement ({config.agreement}) exceeds the generator's "
                             f"{len(seeds)} seeds")

    def __init__(self, config: MspnLossConfig, num_classes: int, feature_channels: int = 0) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        cfg = self.config
        label_lists = batch["label_list"].long()
        present = batch["present"].bool()
        proposed = decode_proposed(batch["proposed"].long(), label_lists, self.num_classes)
        # Labels of the image beyond the bitmask's 8 have no proposal bit: whether a seed proposed them is unknown.
        # Counted as proposed (so L_ind never pushes them down) and passed as ``unlisted`` (so the proposal-based
        # L_neg sets, minority / proposed_below_t, do not push them down either).
        listed = torch.zeros_like(present)
        listed.scatter_(1, label_lists.clamp_min(0), label_lists >= 0)
        unlisted = present & ~listed
        proposed = proposed | unlisted[:, :, None, None]
        # Crop padding has no vote: majority 255, agreement 0 and no proposal (excluded from every term).
        return mspn_hybrid_loss(model(batch["image"]).float(), batch["majority"].long(), batch["agreement"].long(),
                                proposed, present, agreement_threshold=cfg.agreement,
                                negative_weight=cfg.negative_weight, indirect_weight=cfg.indirect_weight,
                                constraint_weight=cfg.constraint_weight, negative_labels=cfg.negative_labels,
                                indirect_labels=cfg.indirect_labels, unlisted=unlisted, term_mean=cfg.term_mean)
