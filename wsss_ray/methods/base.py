"""What every method component of one kind shares: the generator settings and the generator base class.

A pseudo-label generator has two steps so that Ray can place them on different resources: ``model_step`` runs
the classifier (in an actor pool, on a GPU when there is one) and returns float arrays; ``refine_step`` is CPU-only
post-processing (DenseCRF, voting, distance maps) run as plain tasks and returns uint8 maps. Both see the manifest
record (boxes, scribble URI). A generator declares what it writes in ``outputs`` (one PNG per image each, with
the value a training crop pads that map with); ``titles`` are the outputs that are label maps, scored against
ground truth (255 = ignore), with the name tables and pictures show, in display order; ``"pseudo"`` is the one
segmentation training reads.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, Field

from wsss_ray.core.config import CrfConfig, Fraction, Scales, StrictModel, crf_field
from wsss_ray.core.labels import IGNORE_LABEL


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
