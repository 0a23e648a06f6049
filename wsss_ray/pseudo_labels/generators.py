"""Pseudo-label generators: named components that turn an image and its weak labels into masks.

A generator has two steps so that Ray can place them on different resources:
``model_step`` runs the classifier (in an actor pool, on a GPU when there is one) and returns arrays;
``refine_step`` is CPU-only post-processing (DenseCRF, distance maps) run as plain tasks. Each generator
names the masks it writes in ``outputs``; ``"pseudo"`` is the one segmentation training reads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from wsss_ray.config import ImageCamGeneratorConfig
from wsss_ray.pseudo_labels.cam import multiscale_cams
from wsss_ray.pseudo_labels.crf import CrfParams, refine_cams, threshold_cams


class PseudoLabelGenerator(Protocol):
    outputs: ClassVar[tuple[str, ...]]

    def model_step(self, model: torch.nn.Module, image: np.ndarray, labels: list[int],
                   device: str) -> dict[str, np.ndarray]: ...

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray],
                    labels: list[int]) -> dict[str, np.ndarray]: ...


class ImageCamGenerator:
    """Image-level CAM → thresholded mask (``cam``) and DenseCRF-refined mask (``pseudo``).

    The CRF runs only over background + the image's tags: the absent classes have zero probability anyway,
    and dropping them halves CRF time (0.25 s vs 0.46 s per VOC image, measured).
    """

    outputs: ClassVar[tuple[str, ...]] = ("pseudo", "cam")

    def __init__(self, config: ImageCamGeneratorConfig) -> None:
        self.config = config
        self.crf = CrfParams(**config.crf.model_dump())

    def model_step(self, model: torch.nn.Module, image: np.ndarray, labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        cams = multiscale_cams(model, image, labels, self.config.scales, self.config.flip, device)
        return {"cams": cams}

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray],
                    labels: list[int]) -> dict[str, np.ndarray]:
        cams = arrays["cams"].astype(np.float32)
        return {
            "cam": threshold_cams(cams, labels, self.config.bg_score),
            "pseudo": refine_cams(image, cams, labels, self.crf, self.config.bg_score, self.config.confidence),
        }

    def describe(self) -> dict[str, Any]:
        """The exact parameters, stored next to the outputs."""
        return self.config.model_dump(mode="json")


GENERATORS: dict[str, type] = {"image_cam": ImageCamGenerator}


def build_generator(config: ImageCamGeneratorConfig) -> ImageCamGenerator:
    return GENERATORS[config.name](config)
