"""What every method component of one kind shares: its base class (the contract a registry checks at import)
and the generator settings.

Each pluggable kind has one base class here; every declaration a stage reads is a class attribute or a method
of it, with its default on the base, so a component declares only what differs (in the spirit of Ray Train's
``UserCallback``): :class:`ClassifierHead`, :class:`ClassifierObjective`, :class:`Generator`,
:class:`SegmentationObjective` (training hooks: ``training/hooks.py``'s ``TrainHook``).

A pseudo-label generator has two steps so that Ray can place them on different resources: ``model_step`` runs
the classifier (in an actor pool, on a GPU when there is one) and returns float arrays; ``refine_step`` is CPU-only
post-processing (DenseCRF, voting, distance maps) run as plain tasks and returns uint8 maps. Both see the manifest
record (boxes, scribble URI). A generator declares what it writes in ``outputs`` (one PNG per image each, with
the value a training crop pads that map with); ``titles`` are the outputs that are label maps, scored against
ground truth (255 = ignore), with the name tables and pictures show, in display order; ``"pseudo"`` is the one
segmentation training reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from wsss_ray.core.config_base import CrfConfig, Fraction, ParConfig, Scales, StrictModel, crf_field
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.crf import refine_cams
from wsss_ray.maths.par import refine_cams_par


class GeneratorSettings(StrictModel):
    """Fields of every generator: CAMs averaged with their mirror image (the CAM convention of every paper) and
    the DenseCRF that refines them (PSA's set: our unary is a soft score map like PSA's; values left unset in a
    config's ``crf`` section, or ``preset: <name>``, come from ``CRF_PRESETS``)."""

    flip: bool = True
    crf: Annotated[CrfConfig, crf_field("psa")] = CrfConfig()


class MultiScaleSettings(GeneratorSettings):
    """Generators that compute CAMs at several input scales (IRN's set)."""

    scales: Scales = [1.0, 0.5, 1.5, 2.0]  # noqa: RUF012 - a pydantic field


class CamThresholdSettings(StrictModel):
    """Generators that turn max-normalised CAMs into labels with a constant background score (IRN evaluates CAMs
    at 0.15-0.16) and mark pixels whose CRF posterior is below ``confidence`` as 255 (0 keeps every pixel)."""

    bg_score: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    confidence: Fraction = 0.0
    # How the CAM unary is refined: DenseCRF (``crf`` section), or PAR (``par`` section; ToCo's and KTSE's
    # pixel-adaptive refinement, pure torch, a fraction of DenseCRF's time).
    refine: Literal["crf", "par"] = "crf"
    par: ParConfig = ParConfig()

    # Added later, at the values that reproduce the earlier outputs: left out of the stage key (``key_dump``).
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"refine": "crf", "par": ParConfig()}


def refine_cam_mask(image: np.ndarray, cams: np.ndarray, labels: list[int], config: Any) -> np.ndarray:
    """The refined ``(H, W)`` uint8 mask of a generator whose config has ``crf`` and :class:`CamThresholdSettings`:
    DenseCRF (``refine: crf``) or PAR (``refine: par``) over the background score and the CAMs."""
    if config.refine == "par":
        return refine_cams_par(image, cams, labels, config.par, config.bg_score, config.confidence)
    return refine_cams(image, cams, labels, config.crf, config.bg_score, config.confidence)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class Generator(Generic[ConfigT]):
    """Base of the pseudo-label generators (see the module docstring for the two steps and the declarations)."""

    # output name -> the value a training crop pads it with (label maps: ignore; weights and counts: 0)
    outputs: ClassVar[dict[str, int]] = {"pseudo": IGNORE_LABEL}
    # scored label outputs -> their display names, in display order
    titles: ClassVar[dict[str, str]] = {"pseudo": "pseudo-mask"}

    # the scored outputs in the order of ``outputs`` (the stats table's columns); derived, never declared
    labels: ClassVar[tuple[str, ...]] = ("pseudo",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.labels = tuple(name for name in cls.outputs if name in cls.titles)

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def model_step(self, model: torch.nn.Module, image: np.ndarray, record: dict[str, Any], labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray], record: dict[str, Any],
                    labels: list[int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")


Terms = dict[str, torch.Tensor]


class ClassifierHead(nn.Module):
    """Base of the classifier heads (``train_cls.head``), built as ``Head(in_channels, num_foreground, config)``:
    ``forward(features)`` gives image logits ``(N, C)``, ``cams(features)`` un-normalised CAMs ``(N, C, h, w)``."""

    @staticmethod
    def sample_fields(row: Mapping[str, Any], geometry: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
        """The head's per-crop fields besides the image and target, from the manifest row and the crop's
        geometry (BAP: the boxes in the crop's frame); none by default."""
        return {}

    def class_weights(self) -> torch.Tensor | None:
        """The linear classifier's rows ``(C+1, D)``, row 0 = background, where the head has one per class and the
        background (BAP, KTSE); None otherwise (GAP has no background row)."""
        return None


class ClassifierObjective(nn.Module):
    """Base of the classifier losses (``train_cls.loss``), built as ``Objective(loss_config, head_config)``;
    ``forward(model, batch)`` returns ``(loss, terms)`` (terms: detached scalars, logged each epoch)."""

    # the per-pixel maps it reads (none: a classifier trains on image-level targets)
    maps: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check(cls, config: Any, train_cls: Any) -> None:
        """Raise ValueError naming the fields when ``config`` does not fit its ``train_cls`` section."""

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch the coming steps belong to (KTSE's warm-up); ignored by default."""


class SegmentationObjective(nn.Module):
    """Base of the segmentation losses (``train_seg.loss``), built as ``Objective(config, num_classes,
    feature_channels)``; ``forward(model, batch)`` returns ``(loss, terms)``.

    Declarations, with their defaults: ``maps`` the per-pixel maps read from the batch (``label`` is the
    generator's ``pseudo`` after any correction, ``scribble`` the dataset's, any other name a generator output of
    the required generator); ``model_classifier`` the segmenter's classifier its paper trains (``conv`` or
    ``cosine``) when ``train_seg.model.classifier`` is left unset; :meth:`record_fields` training-row fields from
    the manifest record; :meth:`row_fields` per-image fields besides the maps; :meth:`feature_channels` the width of the features it projects; :meth:`check` rules between its config
    and the rest of the experiment; :meth:`resolve` its config completed from the experiment."""

    maps: ClassVar[tuple[str, ...]] = ("label",)
    model_classifier: ClassVar[str] = "conv"

    @staticmethod
    def record_fields(record: Mapping[str, Any], supervision: str) -> dict[str, Any]:
        """Fields of the training row taken from the image's manifest record (MSPN: its label list); none here."""
        return {}

    @staticmethod
    def row_fields(row: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
        """Per-image fields computed from a training row in the data pipeline (MSPN's label set); none here."""
        return {}

    @classmethod
    def feature_channels(cls, config: Any, build_model: Any) -> int:
        """The width passed as ``feature_channels``; ``build_model()`` builds the segmenter. 0: reads only the
        logits (and builds nothing, so the global torch RNG is left as it was)."""
        return 0

    @classmethod
    def check(cls, config: Any, experiment: Any) -> None:
        """Raise ValueError naming the fields when ``config`` does not fit ``experiment`` (a ``PipelineConfig``)."""

    @classmethod
    def resolve(cls, config: Any, train_seg: Any) -> Any:
        """``config`` with values that depend on the rest of the ``train_seg`` section filled in."""
        return config

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch the coming steps belong to (curriculum); ignored by default."""
