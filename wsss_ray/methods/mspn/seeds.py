"""MSPN multi-seed pseudo-masks (Sang et al., JEIT 2025): seeded dropout CAMs and the per-pixel seed vote.

One classifier gives several "seeds": CAMs computed with dropout on the backbone features at a given input
scale. Each seed is refined by DenseCRF into a label map; per pixel the seeds vote, and a label is *clean* when
at least ``t`` seeds agree with the majority, *noisy* otherwise. The vote and the clean mask are pure numpy so
they can be tested on hand-made label maps.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.inference import max_normalised, multiscale_forward

__all__ = ["MAX_PROPOSAL_LABELS", "clean_mask", "dropout_cams", "proposals", "seed_value", "vote"]

# ``proposals`` packs one bit per label of the image into a uint8 PNG.
MAX_PROPOSAL_LABELS = 8


def seed_value(image_id: str, index: int) -> int:
    """Random seed of seed ``index`` for one image.

    ``zlib.crc32`` rather than ``hash()``: Python salts string hashes per process, so the dropout masks (and the
    pseudo-labels) would change between actors and between a run and its resumption.
    """
    return zlib.crc32(f"{image_id}:{index}".encode())


@torch.no_grad()
def dropout_cams(
    model: torch.nn.Module,
    image: np.ndarray,
    labels: Sequence[int],
    dropout: float,
    scale: float,
    flip: bool,
    seed: int,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """CAMs ``(K, H, W)`` in [0, 1] of the classes ``labels`` with feature dropout ``dropout`` at input ``scale``.

    Dropout is ``F.dropout(features, p, training=True)`` written out with an explicit generator: the mask is
    drawn on the CPU from ``seed`` alone, so a seed gives the same CAM on any device and the global torch RNG of
    the actor is left untouched. The mirrored copy gets its own mask (it is a second sample of the same seed).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    h, w = image.shape[:2]
    if len(labels) == 0:
        return np.zeros((0, h, w), np.float32)
    channels = torch.as_tensor([int(label) - 1 for label in labels], device=device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        features = model.backbone(x)
        if dropout > 0:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keep = torch.rand(features.shape, generator=generator) >= dropout
            features = features * keep.to(device=features.device, dtype=features.dtype) / (1.0 - dropout)
        return model.head.cams(features)[:, channels]

    return max_normalised(multiscale_forward(forward, image, [scale], flip, device))


def vote(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel vote of ``(S, H, W)`` uint8 label maps → ``(majority, agreement)``, both ``(H, W)`` uint8.

    ``majority`` is the most frequent label, ``agreement`` how many seeds voted for it (0..S). A 255 vote (a seed
    that was unsure) abstains; a pixel where every seed abstains gets majority 255 and agreement 0. Ties go to the
    smaller class id, so background (0) wins a tie with an object: the conservative choice for a pseudo-label.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (S, H, W), got shape {maps.shape}")
    majority = np.full(maps.shape[1:], IGNORE_LABEL, np.uint8)
    agreement = np.zeros(maps.shape[1:], np.uint8)
    # Ascending label order with a strict ">" keeps the smallest label on ties.
    for label in np.unique(maps):
        if label == IGNORE_LABEL:
            continue
        count = (maps == label).sum(axis=0)
        better = count > agreement
        majority[better] = label
        agreement[better] = count[better]
    return majority, agreement


def clean_mask(majority: np.ndarray, agreement: np.ndarray, threshold: int) -> np.ndarray:
    """The clean pseudo-label: ``majority`` where at least ``threshold`` seeds agree, 255 (noisy) elsewhere."""
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    return np.where(np.asarray(agreement) >= threshold, majority, IGNORE_LABEL).astype(np.uint8)


def proposals(maps: np.ndarray, label_list: Sequence[int]) -> np.ndarray:
    """``(H, W)`` uint8 bitmask: bit k is set where at least one seed proposed ``label_list[k]``.

    ``label_list`` is the image's label set in order (background first, then its tags); MSPN's indirect negative
    learning trains "not c" on the labels of the set that no seed proposed at a pixel. Labels after the
    ``MAX_PROPOSAL_LABELS``-th do not fit in a byte and are left out (training treats them as proposed).
    """
    maps = np.asarray(maps)
    bits = np.zeros(maps.shape[1:], np.uint8)
    for k, label in enumerate(list(label_list)[:MAX_PROPOSAL_LABELS]):
        bits |= ((maps == label).any(axis=0).astype(np.uint8) << k).astype(np.uint8)
    return bits
