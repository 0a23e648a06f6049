"""CDSP scribble pseudo-masks (Zhang et al., AAAI 2024): scribbles over the CAM mask, and distance maps.

The distance entropy loss weights each pixel's prediction entropy by how far it is from the scribbles
(``d_s``, near a scribble = confident) and from the pseudo-label's boundaries (``d_c``, near a boundary =
uncertain). Both are Euclidean distance transforms, precomputed here per image:

    d_s(i) = 1 − min(sqrt(e^λs)·dist(i, nearest scribble pixel), 255) / 255
    d_c(i) = min(sqrt(e^λc)·dist(i, nearest boundary pixel), 255) / 255

(the paper's ``clip(sqrt(e^λ·dist²), 255)``; ``λs = 2``, ``λc = 7`` by default).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt

from wsss_ray.core.labels import IGNORE_LABEL

__all__ = ["apply_scribbles", "boundary_distance", "boundary_mask", "scribble_distance", "to_uint8"]

_CLIP = 255.0


def apply_scribbles(pseudo: np.ndarray, scribble: np.ndarray) -> np.ndarray:
    """The pseudo-label with every scribbled pixel set to its scribble class (the annotation is certain)."""
    pseudo = np.asarray(pseudo)
    scribble = np.asarray(scribble)
    if pseudo.shape != scribble.shape:
        raise ValueError(f"scribble {scribble.shape} and pseudo-label {pseudo.shape} differ in size")
    return np.where(scribble != IGNORE_LABEL, scribble, pseudo).astype(np.uint8)


def _distance_to(targets: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``targets`` (inf when there is none)."""
    if not targets.any():
        # distance_transform_edt of an all-nonzero input is not "infinitely far"; say it explicitly.
        return np.full(targets.shape, np.inf)
    return distance_transform_edt(~targets)


def scribble_distance(scribble: np.ndarray, lambda_s: float) -> np.ndarray:
    """``d_s`` ``(H, W)`` float in [0, 1]: 1 on scribbles, falling to 0 at ``255 / e^(λs/2)`` pixels away.

    Every annotated pixel (255 = not scribbled) counts, background strokes included. No scribble: all 0.
    """
    dist = _distance_to(np.asarray(scribble) != IGNORE_LABEL)
    return 1.0 - np.minimum(math.exp(lambda_s / 2) * dist, _CLIP) / _CLIP


def boundary_mask(label_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels with a 4-neighbour of a different label (both sides of an edge are boundary).

    255 is a label like any other here, so the border of an ignored region is a boundary too.
    """
    labels = np.asarray(label_map)
    edge = np.zeros(labels.shape, bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def boundary_distance(label_map: np.ndarray, lambda_c: float) -> np.ndarray:
    """``d_c`` ``(H, W)`` float in [0, 1]: 0 on boundaries, 1 from ``255 / e^(λc/2)`` pixels away on.

    A map with a single label has no boundary: all 1.
    """
    dist = _distance_to(boundary_mask(label_map))
    return np.minimum(math.exp(lambda_c / 2) * dist, _CLIP) / _CLIP


def to_uint8(weights: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint8 ``round(255·d)`` (how it is stored as a PNG)."""
    return np.rint(np.clip(weights, 0.0, 1.0) * 255.0).astype(np.uint8)
