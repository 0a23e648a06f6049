"""BANA's objectives: the classifier's (BapObjective) and the segmenter's noise-aware loss (NoiseAwareObjective).

The classifier objective (Oh, Kim, Ham, CVPR 2021, Sec. 3.1 "Loss"): train a backbone + ``BapHead`` from
bounding boxes with one (L+1)-way cross-entropy over box features (their class) and background queries (class 0).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.methods.bana.config import BapHeadConfig, BapLossConfig, NoiseAwareConfig
from wsss_ray.methods.bana.head import BapHead, valid_boxes
from wsss_ray.methods.bana.losses import noise_aware_loss
from wsss_ray.methods.base import ClassifierObjective, SegmentationObjective

Terms = dict[str, torch.Tensor]

__all__ = ["BapObjective", "NoiseAwareObjective"]


class BapObjective(ClassifierObjective):
    """``(model, batch) -> (loss, terms)`` for a model with ``.backbone`` and ``.head`` (a ``BapHead``).

    ``batch``: ``"image"`` ``(N, 3, H, W)`` normalised, ``"boxes"`` ``(N, B, 5)`` rows ``[class id 1..C, x1, y1,
    x2, y2]`` in the image's pixels (padding rows have class id −1). ``"target"`` (the multi-hot tags) is not
    needed: the boxes carry the classes.

    With box features ``r_i`` (BANA Eq. 4, target = the box's class) and the valid background queries ``q_j``
    (Eq. 1, target 0) of the whole batch::

        L = (Σ_i CE(w(r_i), c_i) + Σ_j CE(w(q_j), 0)) / (K + J)

    Our reading: BANA applies "a standard cross-entropy loss" to the r_i and q_j together, and the official
    stage-1 code concatenates both kinds and takes one mean, so they are averaged together (J ≈ up to N·grid²
    queries against K boxes, i.e. the background carries most of the weight) rather than as two separately
    averaged terms. ``terms`` splits that one mean into its shares, ``box_ce + bg_ce = loss``, plus the
    ``box_accuracy`` of the box features (0 for a batch without boxes). All terms are detached. An image without
    boxes contributes only its background queries; one covered entirely by boxes only its box features.

    Our reading of Eq. 4's gradient: A is not detached (BANA back-propagates through the attention), so the
    backbone also learns to make background cells inside the boxes resemble the queries.

    The head's own ``grid`` is overridden by ``head_config.grid`` (BANA: 4 in training); both come from the same
    ``ClassifierTrainConfig``. The model is used through ``model.backbone`` and ``model.head``.
    """

    def __init__(self, config: BapLossConfig, head_config: BapHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.grid = head_config.grid

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        head = model.head
        if not isinstance(head, BapHead):
            raise TypeError(f"BapObjective needs a BapHead as model.head, got {type(head).__name__}")
        images = batch["image"]
        boxes = torch.as_tensor(batch["boxes"], device=images.device)
        image_shape = (images.shape[-2], images.shape[-1])
        features = model.backbone(images)
        background = head.background_mask(boxes, (features.shape[-2], features.shape[-1]), image_shape)
        queries, valid_queries = head.background_queries(features, background, self.grid)
        attention = head.attention(features, background, self.grid)
        box_vectors = head.box_features(features, boxes, attention, image_shape)
        labels = boxes[..., 0][valid_boxes(boxes)].long()
        box_logits = head.classify(box_vectors)
        bg_logits = head.classify(queries[valid_queries])

        box_sum = F.cross_entropy(box_logits, labels, reduction="sum")
        bg_sum = F.cross_entropy(bg_logits, torch.zeros(len(bg_logits), dtype=torch.long, device=images.device),
                                 reduction="sum")
        # One mean over both kinds (see the class docstring). K + J >= 1 always: a cell outside every box makes a
        # valid query, and without one the boxes cover the map, so there is a box; the loss therefore always
        # reaches the backbone (DDP needs every parameter to get a gradient).
        count = max(len(box_logits) + len(bg_logits), 1)
        box_ce, bg_ce = box_sum / count, bg_sum / count
        loss = box_ce + bg_ce
        if len(box_logits):
            accuracy = (box_logits.argmax(dim=1) == labels).float().mean()
        else:
            accuracy = box_logits.new_zeros(())
        return loss, {"box_ce": box_ce.detach(), "bg_ce": bg_ce.detach(), "box_accuracy": accuracy.detach()}


class NoiseAwareObjective(SegmentationObjective):
    """BANA's NAL over Y_crf (``label``) and Y_ret (``retrieved``), with the segmenter's features and weights."""

    # BANA's segmenter is a cosine classifier (footnote 4; stage 3): train_seg.model.classifier defaults to it.
    model_classifier: ClassVar[str] = "cosine"
    maps: ClassVar[tuple[str, ...]] = ("label", "retrieved")

    def __init__(self, config: NoiseAwareConfig, num_classes: int = 0, feature_channels: int = 0) -> None:
        super().__init__()
        self.config = config

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        out = model(batch["image"], with_features=True)
        return noise_aware_loss(out["logits"].float(), out["features"].float(), model.classifier_weight().float(),
                                batch["label"].long(), batch["retrieved"].long(), gamma=self.config.gamma,
                                lambda_wce=self.config.lambda_wce, detach_sigma=self.config.detach_sigma)
