"""The method components, one table per pluggable kind. Adding a method is its own folder plus one line here.

Each line names a component, its config model (what ``<section>.name`` selects) and its implementation, and
what it needs elsewhere in the experiment (``requires``), which ``PipelineConfig`` checks in one place. What a
segmentation objective reads (``maps``) and what a generator writes (``outputs``, with each map's padding) are
declared on their classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel
from torch import nn

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.core.registry import Component, Registry
from wsss_ray.methods.bana.config import BapHeadConfig, BapLossConfig, BoxGeneratorConfig, NoiseAwareConfig
from wsss_ray.methods.bana.generator import BoxGenerator
from wsss_ray.methods.bana.head import BapHead
from wsss_ray.methods.bana.objective import BapObjective, NoiseAwareObjective
from wsss_ray.methods.base import Generator
from wsss_ray.methods.cam.config import GapHeadConfig, ImageCamGeneratorConfig, MultiLabelSoftMarginConfig
from wsss_ray.methods.cam.generator import ImageCamGenerator
from wsss_ray.methods.cam.head import GapHead
from wsss_ray.methods.cam.objective import MultiLabelObjective
from wsss_ray.methods.cdsp.config import CdspConfig, ScribbleGeneratorConfig
from wsss_ray.methods.cdsp.generator import ScribbleGenerator
from wsss_ray.methods.cdsp.objective import CdspObjective
from wsss_ray.methods.ktse.config import KtseHeadConfig, KtseLossConfig
from wsss_ray.methods.ktse.head import KtseHead
from wsss_ray.methods.ktse.losses import KtseObjective
from wsss_ray.methods.mspn.config import MspnLossConfig, MultiSeedGeneratorConfig
from wsss_ray.methods.mspn.generator import MultiSeedGenerator
from wsss_ray.methods.mspn.objective import MspnObjective
from wsss_ray.methods.out.config import OutCorrectorConfig
from wsss_ray.methods.out.corrector import OnlineCorrector
from wsss_ray.methods.robust.config import CrossEntropyConfig, CurriculumConfig, SymmetricCrossEntropyConfig
from wsss_ray.methods.robust.objectives import CrossEntropyObjective, CurriculumObjective, SceObjective
from wsss_ray.models.classifier import CamClassifier
from wsss_ray.models.resnet import build_backbone

# train_cls.head: built as head(in_channels, num_foreground, head_config)
CLASSIFIER_HEADS = Registry("train_cls.head", "gap", [
    Component("gap", GapHeadConfig, GapHead),
    Component("ktse", KtseHeadConfig, KtseHead, {"loss": "ktse"}),
    Component("bap", BapHeadConfig, BapHead, {"loss": "bap", "supervision": "boxes"}, "pools features inside boxes"),
])

# train_cls.loss: built as objective(loss_config, head_config)
CLASSIFIER_OBJECTIVES = Registry("train_cls.loss", "multilabel_soft_margin", [
    Component("multilabel_soft_margin", MultiLabelSoftMarginConfig, MultiLabelObjective),
    Component("ktse", KtseLossConfig, KtseObjective, {"head": "ktse"}),
    Component("bap", BapLossConfig, BapObjective, {"head": "bap"}),
])

# pseudo_labels.generator: built as generator(generator_config)
GENERATORS = Registry("pseudo_labels.generator", "image_cam", [
    Component("image_cam", ImageCamGeneratorConfig, ImageCamGenerator),
    Component("multi_seed", MultiSeedGeneratorConfig, MultiSeedGenerator),
    Component("box", BoxGeneratorConfig, BoxGenerator),
    Component("scribble", ScribbleGeneratorConfig, ScribbleGenerator, {"supervision": "scribbles"}),
])

# train_seg.loss: built as objective(loss_config, num_classes, feature_channels)
SEGMENTATION_OBJECTIVES = Registry("train_seg.loss", "cross_entropy", [
    Component("cross_entropy", CrossEntropyConfig, CrossEntropyObjective),
    Component("sce", SymmetricCrossEntropyConfig, SceObjective),
    Component("curriculum", CurriculumConfig, CurriculumObjective),
    Component("nal", NoiseAwareConfig, NoiseAwareObjective, {"generator": "box"}),
    Component("cdsp", CdspConfig, CdspObjective, {"generator": "scribble"}),
    Component("mspn", MspnLossConfig, MspnObjective, {"generator": "multi_seed"}),
])

# train_seg.corrector: a training hook built as corrector(corrector_config, model, stage_uri)
CORRECTORS = Registry("train_seg.corrector", "out", [
    Component("out", OutCorrectorConfig, OnlineCorrector),
])


def build_classifier(config: Any, num_foreground: int) -> CamClassifier:
    """The CAM classifier of ``config`` (a ``train_cls`` section) over ``num_foreground`` classes (no background).

    Throughout the package ``num_classes`` counts background (VOC: 21) and ``num_foreground`` does not (20)."""
    backbone = build_backbone(config.backbone.name, config.backbone.output_stride, config.backbone.weights)
    head = CLASSIFIER_HEADS[config.head.name].build(backbone.out_channels, num_foreground, config.head)
    return CamClassifier(backbone, head, num_foreground)


def build_classifier_objective(config: Any) -> nn.Module:
    """The objective of a ``train_cls`` section's loss, for its head."""
    return CLASSIFIER_OBJECTIVES.build(config.loss, config.head)


def build_generator(config: BaseModel) -> Generator[Any]:
    return GENERATORS.build(config)


def build_segmentation_objective(config: BaseModel, num_classes: int, feature_channels: int) -> nn.Module:
    """The objective of ``train_seg.loss``; ``feature_channels`` is the width of the segmenter's φ (LoRM)."""
    return SEGMENTATION_OBJECTIVES.build(config, num_classes, feature_channels)


def segmentation_maps(loss: BaseModel) -> tuple[str, ...]:
    """The per-pixel maps the objective of ``loss`` reads (what the data pipeline must load and crop)."""
    return SEGMENTATION_OBJECTIVES[loss.name].maps


def segmentation_row_fields(loss: BaseModel) -> Callable[[Mapping[str, Any], int], dict[str, Any]] | None:
    """The objective's per-image fields besides its maps (MSPN's label set), computed from a training row and
    ``num_classes`` in the data pipeline; None if it reads none."""
    return getattr(SEGMENTATION_OBJECTIVES[loss.name].build, "row_fields", None)


def segmentation_feature_source(loss: BaseModel) -> str | None:
    """Which of the segmenter's features the objective projects (``backbone`` or ``head``), so that the trainer
    can pass their width; None for an objective that reads only the logits."""
    source = getattr(SEGMENTATION_OBJECTIVES[loss.name].build, "feature_source", None)
    return source(loss) if source else None


def resolved_segmentation_loss(loss: BaseModel, corrector: OutCorrectorConfig | None) -> BaseModel:
    """``loss`` with the curriculum's ``start_epoch: inflection`` replaced by the corrector's inflection epoch,
    or OuT's default one without a corrector (the epoch from which OuT finds the net memorising noise)."""
    if getattr(loss, "start_epoch", None) == "inflection":
        return loss.model_copy(update={"start_epoch": (corrector or OutCorrectorConfig()).inflection_epoch})
    return loss


def map_padding() -> dict[str, int]:
    """What a training crop pads each map with: the pseudo-mask (``label``) and the dataset's scribbles are label
    maps; each generator declares its other outputs (their names are unique across generators)."""
    padding = {"label": IGNORE_LABEL, "scribble": IGNORE_LABEL}
    for component in GENERATORS.components():
        padding.update({k: v for k, v in component.outputs.items() if k != "pseudo"})
    return padding
