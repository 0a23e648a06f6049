"""CDSP scribble pseudo-masks (Zhang et al., AAAI 2024): scribbles over the CAM mask, and distance maps.

The distance entropy loss weights each pixel's prediction entropy by how far it is from the foreground scribbles
(``d_s``, near a scribble = confident) and from the foreground contour of the CAM pseudo-label (``d_c``, near the
contour = uncertain). Both are Euclidean distance transforms, precomputed here per image (Eqs. 14, 16):

    q(i) = ⌊sqrt(e^λ)·dist(i, nearest source)⌋ clipped at 255,   d_s = (255 − q_s)/255,   d_c = q_c/255

(the paper's ``⌊sqrt(e^λ·dist²)⌋_255 / 255``; ``λs = 2``, ``λc = 7`` by default). The sources, per the paper
("the j-th foreground scribble point", "the j-th point on the foreground pseudo-label boundary") and the
authors' ``distancemp`` scripts: scribble pixels of a foreground class (background strokes are not sources), and
the contour of the binary foreground mask (all classes merged, 255 = background). Each reading we used before is
an option (``sources="all"``, ``boundary="label_edges"``, ``quantise="round"``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt

from wsss_ray.core.labels import IGNORE_LABEL

__all__ = ["apply_scribbles", "boundary_distance", "boundary_mask", "foreground_contour", "scribble_distance",
           "to_uint8"]

_CLIP = 255.0


def apply_scribbles(pseudo: np.ndarray, scribble: np.ndarray) -> np.ndarray:
    """The pseudo-label with every scribbled pixel set to its scribble class (the annotation is certain)."""
    pseudo = np.asarray(pseudo)
    scribble = np.asarray(scribble)
    if pseudo.shape != scribble.shape:
        raise ValueError(f"scribble {scribble.shape} and pseudo-label {pseudo.shape} differ in size")
    return np.where(scribble != IGNORE_LABEL, scribble, pseudo).astype(np.uint8)


def _scaled_distance(targets: np.ndarray, lam: float, quantise: str) -> np.ndarray:
    """``q = min(255, Q(e^(λ/2)·dist))`` to the nearest True pixel of ``targets`` (255 everywhere without one),
    ``Q`` = floor (the authors' uint8 cast, the paper's ⌊·⌋) or round (our old reading)."""
    if quantise not in ("floor", "round"):
        raise ValueError(f"quantise must be 'floor' or 'round', got {quantise!r}")
    if not targets.any():
        # distance_transform_edt of an all-nonzero input is not "infinitely far"; say it explicitly.
        return np.full(targets.shape, _CLIP)
    scaled = math.exp(lam / 2) * distance_transform_edt(~targets)
    return np.minimum(np.floor(scaled) if quantise == "floor" else np.rint(scaled), _CLIP)


def scribble_distance(scribble: np.ndarray, lambda_s: float, sources: str = "foreground",
                      quantise: str = "floor") -> np.ndarray:
    """``d_s`` ``(H, W)`` float in [0, 1] (a multiple of 1/255): 1 on the source scribbles, 0 from
    ``255 / e^(λs/2)`` pixels away on.

    ``sources="foreground"``: scribble pixels of classes ∉ {0, 255} (the paper and the authors' code);
    ``"all"``: every annotated pixel, background strokes included (our old reading). No source: all 0.
    """
    scribble = np.asarray(scribble)
    if sources not in ("foreground", "all"):
        raise ValueError(f"scribble sources must be 'foreground' or 'all', got {sources!r}")
    targets = scribble != IGNORE_LABEL
    if sources == "foreground":
        targets &= scribble != 0
    return (_CLIP - _scaled_distance(targets, lambda_s, quantise)) / _CLIP


def boundary_mask(label_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels with a 4-neighbour of a different label (both sides of an edge are boundary).

    255 is a label like any other here, so the border of an ignored region is a boundary too (``label_edges``).
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


def foreground_contour(label_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: the contour of the binary foreground ``B = [label ∉ {0, 255}]`` (classes merged).

    A pixel of ``B`` with a 4-neighbour outside ``B`` or outside the image: the border pixels that the authors'
    ``cv2.findContours`` traces and draws 1 px thick (OpenCV pads the image with zeros, so foreground touching
    the image edge has its edge pixels on the contour; our reading of the library, not checked on a binary).
    """
    labels = np.asarray(label_map)
    inside = np.pad((labels != 0) & (labels != IGNORE_LABEL), 1)  # zero padding = outside the image
    core = inside[1:-1, 1:-1]
    all_neighbours_inside = inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return core & ~all_neighbours_inside


def boundary_distance(label_map: np.ndarray, lambda_c: float, boundary: str = "foreground_contour",
                      quantise: str = "floor") -> np.ndarray:
    """``d_c`` ``(H, W)`` float in [0, 1] (a multiple of 1/255): 0 on the boundary, 1 from ``255 / e^(λc/2)``
    pixels away on.

    ``boundary="foreground_contour"``: :func:`foreground_contour` (the paper and the authors' code);
    ``"label_edges"``: :func:`boundary_mask`, both sides of every label change (our old reading). No boundary:
    all 1.
    """
    if boundary not in ("foreground_contour", "label_edges"):
        raise ValueError(f"boundary must be 'foreground_contour' or 'label_edges', got {boundary!r}")
    edges = foreground_contour(label_map) if boundary == "foreground_contour" else boundary_mask(label_map)
    return _scaled_distance(edges, lambda_c, quantise) / _CLIP


def to_uint8(weights: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint8 ``round(255·d)`` (how it is stored as a PNG; exact for the quantised maps above)."""
    return np.rint(np.clip(weights, 0.0, 1.0) * 255.0).astype(np.uint8)
