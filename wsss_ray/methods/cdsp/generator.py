"""CDSP's pseudo-label generator: a CRF-refined CAM mask with the scribbles on top, and the distance maps."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from wsss_ray.core.items import BadItemError
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.data.image_io import read_label
from wsss_ray.maths.inference import multiscale_cams
from wsss_ray.methods.base import Generator, refine_cam_mask
from wsss_ray.methods.cdsp.config import ScribbleGeneratorConfig
from wsss_ray.methods.cdsp.distance import apply_scribbles, boundary_distance, scribble_distance, to_uint8


class ScribbleGenerator(Generator[ScribbleGeneratorConfig]):
    """CDSP: CRF-refined CAM mask of the scribbles' classes with the scribbles on top (``pseudo``), and the
    distance maps of the distance entropy loss (``dist_scribble`` = d_s, ``dist_boundary`` = d_c, uint8 255·d).

    d_s is measured to the foreground scribbles, d_c to the foreground contour of the CRF-refined CAM mask before
    the scribbles are pasted (``boundary_source="cam_pseudo"``, the authors' code); see ``methods/cdsp/distance``.
    """

    outputs: ClassVar[dict[str, int]] = {"pseudo": IGNORE_LABEL, "dist_scribble": 0, "dist_boundary": 0}
    titles: ClassVar[dict[str, str]] = {"pseudo": "pseudo-mask"}

    def model_step(self, model: torch.nn.Module, image: np.ndarray, record: dict[str, Any], labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        return {"cams": multiscale_cams(model, image, labels, self.config.scales, self.config.flip, device)}

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray], record: dict[str, Any],
                    labels: list[int]) -> dict[str, np.ndarray]:
        if not record.get("scribble_uri"):
            raise BadItemError(str(record.get("image_uri")), "scribble generator but the image has no scribble file")
        scribble = read_label(record["scribble_uri"])
        if scribble.shape != image.shape[:2]:
            raise BadItemError(record["scribble_uri"], f"scribble {scribble.shape} differs from image {image.shape[:2]}")
        cams = arrays["cams"].astype(np.float32)
        mask = refine_cam_mask(image, cams, labels, self.config)
        pseudo = apply_scribbles(mask, scribble)
        cfg = self.config
        d_s = scribble_distance(scribble, cfg.lambda_s, cfg.scribble_sources, cfg.quantise)
        d_c = boundary_distance(mask if cfg.boundary_source == "cam_pseudo" else pseudo, cfg.lambda_c, cfg.boundary,
                                cfg.quantise)
        return {"pseudo": pseudo, "dist_scribble": to_uint8(d_s), "dist_boundary": to_uint8(d_c)}
