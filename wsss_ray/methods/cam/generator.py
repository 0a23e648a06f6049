"""The CAM baseline's pseudo-label generator: multi-scale + flip CAMs, a background score, DenseCRF."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.crf import threshold_cams
from wsss_ray.maths.inference import multiscale_cams
from wsss_ray.methods.base import Generator, refine_cam_mask
from wsss_ray.methods.cam.config import ImageCamGeneratorConfig


class ImageCamGenerator(Generator[ImageCamGeneratorConfig]):
    """Image-level CAM → thresholded mask (``cam``) and DenseCRF-refined mask (``pseudo``).

    The CRF runs only over background + the image's tags: the absent classes have zero probability anyway,
    and dropping them halves CRF time (0.25 s vs 0.46 s per VOC image, measured).
    """

    outputs: ClassVar[dict[str, int]] = {"pseudo": IGNORE_LABEL, "cam": IGNORE_LABEL}
    titles: ClassVar[dict[str, str]] = {"cam": "thresholded CAM", "pseudo": "pseudo-mask"}

    def model_step(self, model: torch.nn.Module, image: np.ndarray, record: dict[str, Any], labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        cams = multiscale_cams(model, image, labels, self.config.scales, self.config.flip, device)
        return {"cams": cams}

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray], record: dict[str, Any],
                    labels: list[int]) -> dict[str, np.ndarray]:
        cams = arrays["cams"].astype(np.float32)
        return {
            "cam": threshold_cams(cams, labels, self.config.bg_score),
            "pseudo": refine_cam_mask(image, cams, labels, self.config),
        }
