"""BANA box pseudo-masks (Oh, Kim, Ham, CVPR 2021): background attention, box unaries, prototype retrieval.

Boxes are ``[label, x1, y1, x2, y2]`` in pixels, 0-based, ``x2``/``y2`` exclusive (the manifest's convention).
Feature maps are ``(C, h, w)`` at the backbone's output stride; a feature cell stands for the image region
``[j·W/w, (j+1)·W/w) × [i·H/h, (i+1)·H/h)`` and counts as inside a box when its centre lies inside it. All
functions are pure numpy so they can be tested on hand-made features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "background_attention",
    "box_constrained_argmax",
    "box_fill",
    "box_unaries",
    "boxes_array",
    "cell_centres_in_boxes",
    "class_box_masks",
    "prototypes",
    "retrieval_prototypes",
    "retrieve",
]

_EPS = 1e-6


def boxes_array(boxes: Any) -> np.ndarray:
    """``(B, 5)`` int64 boxes from a manifest value: a list of lists, a numpy array of arrays (what Ray Data
    hands over for a list column), or None."""
    if boxes is None:
        return np.zeros((0, 5), np.int64)
    rows = [[int(v) for v in np.asarray(box).tolist()] for box in boxes]
    if any(len(row) != 5 for row in rows):
        raise ValueError(f"boxes must be [label, x1, y1, x2, y2], got {rows}")
    return np.asarray(rows, np.int64).reshape(-1, 5)


def cell_centres_in_boxes(boxes: np.ndarray, feature_shape: tuple[int, int],
                          image_shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` bool: feature cells whose centre (in image pixels) lies inside any of ``boxes``."""
    h, w = feature_shape
    height, width = image_shape
    cy = (np.arange(h) + 0.5) * height / h
    cx = (np.arange(w) + 0.5) * width / w
    inside = np.zeros((h, w), bool)
    for _, x1, y1, x2, y2 in boxes_array(boxes):
        inside |= ((cy >= y1) & (cy < y2))[:, None] & ((cx >= x1) & (cx < x2))[None, :]
    return inside


def _unit(features: np.ndarray) -> np.ndarray:
    """L2-normalise along axis 0 (cosine similarity becomes a dot product)."""
    return features / np.maximum(np.linalg.norm(features, axis=0, keepdims=True), _EPS)


def background_attention(features: np.ndarray, background: np.ndarray, grid: int = 1) -> np.ndarray:
    """Background attention ``A(p) = mean_j ReLU(cos(f(p), q_j))`` at every feature cell, ``(h, w)`` float32.

    ``background`` ``(h, w)`` bool marks cells outside every box. The map is split into a ``grid``×``grid`` grid
    (as equal as the size allows); ``q_j`` is the mean feature of the background cells of grid cell ``j``, and
    grid cells without background give no query. With no background cell at all there is no query and A = 0.

    BANA defines u_0 = 1 outside the boxes; that is applied in :func:`box_unaries` at pixel resolution (after
    upsampling), so that a small box which holds no feature-cell centre still gets the attention of its cells.
    """
    features = np.asarray(features, np.float32)
    background = np.asarray(background, bool)
    if features.ndim != 3 or background.shape != features.shape[1:]:
        raise ValueError(f"features (C, h, w) {features.shape} and background (h, w) {background.shape} differ")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    _, h, w = features.shape
    rows = np.array_split(np.arange(h), grid)
    cols = np.array_split(np.arange(w), grid)
    queries = []
    for r in rows:
        for c in cols:
            if len(r) == 0 or len(c) == 0:
                continue
            cell = np.zeros((h, w), bool)
            cell[r[0]:r[-1] + 1, c[0]:c[-1] + 1] = True
            cell &= background
            if cell.any():
                queries.append(features[:, cell].mean(axis=1))
    if not queries:
        return np.zeros((h, w), np.float32)
    q = _unit(np.stack(queries, axis=1))  # (C, J)
    cos = np.einsum("cj,chw->jhw", q, _unit(features))
    return np.maximum(cos, 0.0).mean(axis=0).astype(np.float32)


def class_box_masks(boxes: np.ndarray, labels: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """``(K, H, W)`` bool: pixels inside any box of class ``labels[k]``."""
    masks = np.zeros((len(labels), *shape), bool)
    index = {int(label): k for k, label in enumerate(labels)}
    for label, x1, y1, x2, y2 in boxes_array(boxes):
        if int(label) in index:
            masks[index[int(label)], y1:y2, x1:x2] = True
    return masks


def box_fill(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The plain box baseline ``(H, W)`` uint8: each box filled with its class, background elsewhere.

    Larger boxes are painted first so a smaller box lying on a larger one stays visible (a small box inside a
    large one is usually an object in front of it). Equal areas keep the manifest order.
    """
    mask = np.zeros(shape, np.uint8)
    boxes = boxes_array(boxes)
    areas = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    for label, x1, y1, x2, y2 in boxes[np.argsort(-areas, kind="stable")]:
        mask[y1:y2, x1:x2] = label
    return mask


def _background_unary(attention: np.ndarray, in_box: np.ndarray, bg_threshold: float, mode: str) -> np.ndarray:
    """u_0 (Eq. 7 with "thresholding A with 0.99"): 1 outside every box, the thresholded attention inside.

    ``relative_zero`` (BANA stage2.py): A below ``bg_threshold · max A`` becomes 0, the max taken over the whole
    raw map (outside-box pixels included). ``absolute_pin`` (our earlier reading): A ≥ ``bg_threshold`` → 1.
    """
    if mode == "relative_zero":
        kept = np.where(attention < bg_threshold * float(attention.max(initial=0.0)), 0.0, attention)
    elif mode == "absolute_pin":
        kept = np.where(attention >= bg_threshold, 1.0, np.clip(attention, 0.0, 1.0))
    else:
        raise ValueError(f"bg_threshold_mode must be 'relative_zero' or 'absolute_pin', got {mode!r}")
    return np.where(in_box, kept, 1.0).astype(np.float32)


def _cam_unaries(cams: np.ndarray, labels: Sequence[int], boxes: np.ndarray, inside: np.ndarray,
                 cam_norm: str) -> np.ndarray:
    """u_c (Eq. 5): ReLU(CAM_c) over its max inside the boxes of c, 0 outside them.

    ``per_box`` (BANA stage2.py): the max of each box of class c, a later box overwriting an earlier one where
    they overlap; ``per_class`` (our earlier reading): one max over all boxes of c.
    """
    positive = np.clip(cams, 0.0, None)
    uc = np.zeros_like(positive)
    if cam_norm == "per_class":
        for k in range(len(labels)):
            if inside[k].any():
                peak = max(float(positive[k][inside[k]].max()), _EPS)
                uc[k] = np.where(inside[k], positive[k] / peak, 0.0)
        return uc
    if cam_norm != "per_box":
        raise ValueError(f"cam_norm must be 'per_box' or 'per_class', got {cam_norm!r}")
    index = {int(label): k for k, label in enumerate(labels)}
    for label, x1, y1, x2, y2 in boxes_array(boxes):
        k = index.get(int(label))
        if k is None or x2 <= x1 or y2 <= y1:
            continue
        region = positive[k, y1:y2, x1:x2]
        uc[k, y1:y2, x1:x2] = region / (float(region.max()) + 1e-12)
    return uc


def box_unaries(cams: np.ndarray, labels: Sequence[int], boxes: np.ndarray, attention: np.ndarray,
                bg_threshold: float, bg_threshold_mode: str = "relative_zero", unary: str = "softmax",
                cam_norm: str = "per_box") -> np.ndarray:
    """``(K+1, H, W)`` probabilities for DenseCRF: background ``u_0`` then ``u_c`` per class of ``labels``.

    ``attention`` is the raw background attention A at every pixel (not set to 1 outside the boxes: the relative
    threshold takes the max over the whole map). u_0 and u_c as in :func:`_background_unary` and
    :func:`_cam_unaries`. Outside every box the unary is (1, 0, …, 0). Inside a box, ``softmax`` (BANA stage2.py):
    softmax over all K+1 channels, classes whose box does not hold the pixel taking part with 0; ``l1`` (our
    earlier reading): the scores over their sum, uniform over the allowed labels where they are all 0.
    """
    cams = np.asarray(cams, np.float32)
    attention = np.asarray(attention, np.float32)
    if cams.shape[0] != len(labels) or cams.shape[1:] != attention.shape:
        raise ValueError(f"cams {cams.shape}, {len(labels)} labels and attention {attention.shape} disagree")
    inside = class_box_masks(boxes, labels, attention.shape)  # (K, H, W)
    in_box = inside.any(axis=0)
    u0 = _background_unary(attention, in_box, bg_threshold, bg_threshold_mode)
    scores = np.concatenate([u0[None], _cam_unaries(cams, labels, boxes, inside, cam_norm)]).astype(np.float32)
    if unary == "softmax":
        exp = np.exp(scores - scores.max(axis=0, keepdims=True))
        soft = exp / exp.sum(axis=0, keepdims=True)
        outside = np.zeros_like(scores)
        outside[0] = 1.0
        return np.where(in_box[None], soft, outside).astype(np.float32)
    if unary != "l1":
        raise ValueError(f"unary must be 'softmax' or 'l1', got {unary!r}")
    allowed = np.concatenate([np.ones((1, *attention.shape), bool), inside])
    total = scores.sum(axis=0, keepdims=True)
    uniform = allowed / allowed.sum(axis=0, keepdims=True)
    return np.where(total > _EPS, scores / np.maximum(total, _EPS), uniform).astype(np.float32)


def box_constrained_argmax(posterior: np.ndarray, labels: Sequence[int], inside: np.ndarray) -> np.ndarray:
    """Y_crf ``(H, W)`` uint8 from the CRF posterior ``(K+1, H, W)``: class c's channel is multiplied by the mask
    of its boxes first (BANA stage2.py), so the softmax unary's small share for classes whose box does not hold a
    pixel can never win there. Channel 0 is background."""
    masked = np.asarray(posterior, np.float32).copy()
    masked[1:] *= np.asarray(inside, bool)
    return np.array([0, *labels], np.uint8)[masked.argmax(axis=0)]


def _cell_weights(label_map: np.ndarray, value: int, feature_shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each feature cell's pixels equal to ``value`` (area pooling onto the feature grid)."""
    h, w = feature_shape
    height, width = label_map.shape
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    hits = np.zeros((h, w), np.float64)
    counts = np.zeros((h, w), np.float64)
    np.add.at(hits, (rows[:, None], cols[None, :]), label_map == value)
    np.add.at(counts, (rows[:, None], cols[None, :]), 1.0)
    return hits / np.maximum(counts, 1.0)


def prototypes(features: np.ndarray, label_map: np.ndarray, classes: Sequence[int]) -> dict[int, np.ndarray]:
    """Prototype ``q_c`` ``(C,)`` of each class in ``classes`` present in the full-resolution ``label_map``.

    BANA averages f over the pixels of ``Y_crf == c``. At stride 16 a small object may hold no cell centre, so
    instead of nearest downsampling each cell is weighted by the fraction of its pixels labelled c (identical for
    cells entirely inside or outside the class, and no present class is ever lost).
    """
    features = np.asarray(features, np.float32)
    protos: dict[int, np.ndarray] = {}
    for c in classes:
        weights = _cell_weights(np.asarray(label_map), int(c), features.shape[1:])
        if weights.sum() > 0:
            protos[int(c)] = (features * weights[None]).sum(axis=(1, 2)) / weights.sum()
    return protos


def retrieval_prototypes(features: np.ndarray, label_map: np.ndarray, classes: Sequence[int],
                         fallback: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Y_ret's prototypes of ``classes`` (background first, then the tags): :func:`prototypes` of Y_crf, and for a
    class with no pixel in Y_crf the row of ``fallback`` ``(len(classes), C)`` in the same order, the classifier's
    w_c (BANA stage2.py; :func:`retrieve` normalises it, so this is the normalised w_c). Without ``fallback``
    such a class has no prototype and cannot appear in Y_ret (our earlier reading)."""
    protos = prototypes(features, label_map, classes)
    if fallback is not None:
        for row, c in zip(np.asarray(fallback, np.float32), classes, strict=True):
            protos.setdefault(int(c), row)
    return protos


def retrieve(features: np.ndarray, protos: dict[int, np.ndarray], image_shape: tuple[int, int],
             allowed: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """``Y_ret`` ``(H, W)`` uint8: per pixel the class whose prototype is most cosine-similar to f.

    Similarities are computed at feature resolution and upsampled nearest to ``image_shape``. ``allowed`` maps a
    class to an ``(H, W)`` bool mask of where it may appear (the box constraint); classes without an entry are
    allowed everywhere. A pixel where no prototype is allowed is background (0).
    """
    height, width = image_shape
    if not protos:
        return np.zeros(image_shape, np.uint8)
    classes = sorted(protos)
    features = np.asarray(features, np.float32)
    _, h, w = features.shape
    q = _unit(np.stack([protos[c] for c in classes], axis=1))
    cos = np.einsum("cj,chw->jhw", q, _unit(features))
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    scores = cos[:, rows[:, None], cols[None, :]]  # (L, H, W), nearest upsampling
    if allowed:
        for k, c in enumerate(classes):
            if c in allowed:
                scores[k][~allowed[c]] = -np.inf
    best = scores.argmax(axis=0)
    out = np.asarray(classes, np.uint8)[best]
    out[np.isneginf(scores.max(axis=0))] = 0
    return out
