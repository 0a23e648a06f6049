"""The method components, one table per pluggable kind. Adding a method is its own folder plus one line here.

Each line names a component, its config model (what ``<section>.name`` selects) and its implementation, and
what it needs elsewhere in the experiment (``requires``), which ``PipelineConfig`` checks in one place. Everything
else a component declares is on its class, a subclass of its kind's base in ``methods/base.py`` (what a
segmentation objective reads, ``maps``; what a generator writes, ``outputs``; ...), which each table checks at
import. The stages and ``config.py`` reach the families only through this module.
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
from wsss_ray.methods.base import ClassifierHead, ClassifierObjective, Generator, SegmentationObjective
from wsss_ray.methods.cam.config import GapHeadConfig, ImageCamGeneratorConfig, MultiLabelSoftMarginConfig
from wsss_ray.methods.cam.generator import ImageCamGenerator
from wsss_ray.methods.cam.head import GapHead
from wsss_ray.methods.cam.objective import MultiLabelObjective
from wsss_ray.methods.cdsp.config import CdspConfig, ScribbleGeneratorConfig
from wsss_ray.methods.cdsp.generator import ScribbleGenerator
from wsss_ray.methods.cdsp.objective import CdspObjective
from wsss_ray.methods.ktse.config import KtseHeadConfig, KtseLossConfig
from wsss_ray.methods.ktse.head import KtseHead
from wsss_ray.methods.ktse.objective import KtseObjective
from wsss_ray.methods.mspn.config import MspnLossConfig, MultiSeedGeneratorConfig
from wsss_ray.methods.mspn.generator import MultiSeedGenerator
from wsss_ray.methods.mspn.objective import MspnObjective
from wsss_ray.methods.out_correction.config import OutCorrectorConfig
from wsss_ray.methods.out_correction.hook import OnlineCorrector
from wsss_ray.methods.robust.config import (
    CrossEntropyConfig,
    CurriculumConfig,
    EarlyLearningConfig,
    SymmetricCrossEntropyConfig,
)
from wsss_ray.methods.robust.hook import EarlyLearning
from wsss_ray.methods.robust.objective import CrossEntropyObjective, CurriculumObjective, SceObjective
from wsss_ray.models.classifier import CamClassifier
from wsss_ray.models.resnet import build_backbone
from wsss_ray.training.hooks import TrainHook

__all__ = ["CLASSIFIER_HEADS", "CLASSIFIER_OBJECTIVES", "CORRECTORS", "GENERATORS", "SEGMENTATION_OBJECTIVES",
           "EarlyLearningConfig", "build_classifier", "build_classifier_objective", "build_generator",
           "build_training_hooks", "check_generator_outputs", "map_padding", "resolved_segmentation_loss", "segmentation_maps",
           "segmentation_row_fields"]

# train_cls.head: built as head(in_channels, num_foreground, head_config)
CLASSIFIER_HEADS = Registry("train_cls.head", "gap", [
    Component("gap", GapHeadConfig, GapHead),
    Component("ktse", KtseHeadConfig, KtseHead, {"loss": "ktse"}),
    Component("bap", BapHeadConfig, BapHead, {"loss": "bap", "supervision": "boxes"}, "pools features inside boxes"),
], ClassifierHead)

# train_cls.loss: built as objective(loss_config, head_config)
CLASSIFIER_OBJECTIVES = Registry("train_cls.loss", "multilabel_soft_margin", [
    Component("multilabel_soft_margin", MultiLabelSoftMarginConfig, MultiLabelObjective),
    Component("ktse", KtseLossConfig, KtseObjective, {"head": "ktse"}),
    Component("bap", BapLossConfig, BapObjective, {"head": "bap"}),
], ClassifierObjective)

# pseudo_labels.generator: built as generator(generator_config)
GENERATORS = Registry("pseudo_labels.generator", "image_cam", [
    Component("image_cam", ImageCamGeneratorConfig, ImageCamGenerator),
    Component("multi_seed", MultiSeedGeneratorConfig, MultiSeedGenerator),
    Component("box", BoxGeneratorConfig, BoxGenerator, {"supervision": "boxes"}, "reads the box annotations"),
    Component("scribble", ScribbleGeneratorConfig, ScribbleGenerator, {"supervision": "scribbles"}),
], Generator)

# train_seg.loss: built as objective(loss_config, num_classes, feature_channels)
SEGMENTATION_OBJECTIVES = Registry("train_seg.loss", "cross_entropy", [
    Component("cross_entropy", CrossEntropyConfig, CrossEntropyObjective),
    Component("sce", SymmetricCrossEntropyConfig, SceObjective),
    Component("curriculum", CurriculumConfig, CurriculumObjective),
    Component("nal", NoiseAwareConfig, NoiseAwareObjective, {"generator": "box"}),
    Component("cdsp", CdspConfig, CdspObjective, {"generator": "scribble"}),
    Component("mspn", MspnLossConfig, MspnObjective, {"generator": "multi_seed"}),
], SegmentationObjective)

# train_seg.corrector: a training hook built as corrector(corrector_config, model, stage_uri)
CORRECTORS = Registry("train_seg.corrector", "out", [
    Component("out", OutCorrectorConfig, OnlineCorrector),
], TrainHook)


def check_generator_outputs(generators: Registry[Generator[Any]]) -> None:
    """A generator output other than ``pseudo`` is a training map named after it: unique across generators and
    never one of the maps every experiment has (``label``: the pseudo-mask; ``scribble``: the dataset's)."""
    owner: dict[str, str] = {}
    for component in generators.components():
        for output in component.build.outputs:
            if output == "pseudo":
                continue
            if output in ("label", "scribble") or output in owner:
                raise ValueError(f"{generators.field}: {component.name!r} writes {output!r}, a name already "
                                 f"taken by {owner.get(output, 'every experiment')}")
            owner[output] = repr(component.name)


check_generator_outputs(GENERATORS)


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


def segmentation_maps(loss: BaseModel) -> tuple[str, ...]:
    """The per-pixel maps the objective of ``loss`` reads (what the data pipeline must load and crop)."""
    return SEGMENTATION_OBJECTIVES.implementation(loss.name).maps


def segmentation_row_fields(loss: BaseModel) -> Callable[[Mapping[str, Any], int], dict[str, Any]] | None:
    """The objective's per-image fields besides its maps (MSPN's label set), computed from a training row and
    ``num_classes`` in the data pipeline; None if it reads none (it keeps the base's ``row_fields``)."""
    objective = SEGMENTATION_OBJECTIVES.implementation(loss.name)
    return None if objective.row_fields is SegmentationObjective.row_fields else objective.row_fields


def resolved_segmentation_loss(loss: BaseModel, corrector: BaseModel | None) -> BaseModel:
    """``loss`` completed from the rest of its section (the curriculum's ``start_epoch: inflection``: the
    corrector's inflection epoch), as its objective's ``resolve`` declares."""
    return SEGMENTATION_OBJECTIVES.implementation(loss.name).resolve(loss, corrector)


def build_segmentation_objective(config: Any, num_classes: int, build_model: Callable[[], nn.Module]) -> nn.Module:
    """The objective of a ``train_seg`` section, for the model ``build_model()`` builds (its feature width)."""
    objective = SEGMENTATION_OBJECTIVES.implementation(config.loss.name)
    width = objective.feature_channels(config.loss, build_model)
    return objective(resolved_segmentation_loss(config.loss, config.corrector), num_classes, width)


def build_training_hooks(config: Any, model: nn.Module, stage_uri: str) -> list[TrainHook]:
    """The training hooks of a ``train_seg`` section, in the order the loop calls them: OuT's corrector (edits
    the batch, updates its teacher), then robust early-learning (edits the gradients)."""
    hooks: list[TrainHook] = []
    if config.corrector is not None:
        hooks.append(CORRECTORS.build(config.corrector, model, stage_uri))
    if config.early_learning is not None:
        hooks.append(EarlyLearning(config.early_learning.key_fraction, config.early_learning.ranking))
    return hooks


def map_padding() -> dict[str, int]:
    """What a training crop pads each map with: the pseudo-mask (``label``) and the dataset's scribbles are label
    maps; each generator declares its other outputs (their names are unique across generators: the declarations
    test checks it)."""
    padding = {"label": IGNORE_LABEL, "scribble": IGNORE_LABEL}
    for component in GENERATORS.components():
        padding.update({k: v for k, v in component.outputs.items() if k != "pseudo"})
    return padding
