"""MSPN's pseudo-label generator: CAMs of several (dropout, scale) seeds, each CRF-refined, and their vote."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.crf import refine_cams
from wsss_ray.methods.base import Generator
from wsss_ray.methods.mspn.config import MultiSeedGeneratorConfig
from wsss_ray.methods.mspn.seeds import clean_mask, dropout_cams, proposals, seed_value, vote


class MultiSeedGenerator(Generator[MultiSeedGeneratorConfig]):
    """MSPN: CAMs of several (dropout, scale) seeds, each CRF-refined, and their per-pixel vote.

    ``pseudo`` is the clean mask (the majority label where at least ``agreement`` seeds agree, 255 = noisy),
    ``majority`` the vote without the agreement filter, ``agreement`` the number of agreeing seeds (0..S) and
    ``single`` seed 0's label map alone (the single-seed baseline the vote is compared against) and ``proposed``
    which of the image's labels (background, then its tags) any seed proposed, one bit each (MSPN's complementary
    labels).
    """

    outputs: ClassVar[dict[str, int]] = {"pseudo": IGNORE_LABEL, "majority": IGNORE_LABEL, "agreement": 0,
                                         "single": IGNORE_LABEL, "proposed": 0}
    titles: ClassVar[dict[str, str]] = {"pseudo": "pseudo-mask", "single": "single seed", "majority": "seed majority"}

    def model_step(self, model: torch.nn.Module, image: np.ndarray, record: dict[str, Any], labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        # Each seed's dropout mask comes from (image id, seed index) only: re-runs and resumed runs agree.
        cams = [dropout_cams(model, image, labels, dropout, scale, self.config.flip,
                             seed_value(str(record["image_id"]), index), device)
                for index, (dropout, scale) in enumerate(self.config.seeds)]
        return {"cams": np.stack(cams)}

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray], record: dict[str, Any],
                    labels: list[int]) -> dict[str, np.ndarray]:
        cams = arrays["cams"].astype(np.float32)
        maps = np.stack([refine_cams(image, seed_cams, labels, self.config.crf, self.config.bg_score,
                                     self.config.confidence) for seed_cams in cams])
        majority, agreement = vote(maps)
        return {"pseudo": clean_mask(majority, agreement, self.config.agreement), "majority": majority,
                "agreement": agreement, "single": maps[0], "proposed": proposals(maps, [0, *labels])}
