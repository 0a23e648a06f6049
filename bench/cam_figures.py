"""Mechanism figures of KTSE and BANA (stage 1-2) for ``bench/classifier_quality.py``: pure pixel counts.

Each figure is a function of label maps (or CAMs) and the ground truth of ONE image that returns counts; the
bench sums the counts over the images and only then divides (pixel ratios, not per-image means). GT = 255 is
left out of every numerator and denominator. Definitions: docs/fidelity-review.md, "Fidelity benchmark —
mechanism figures", the KTSE and BANA paragraphs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

IGNORE = 255
# Instance size bins by area over the image's pixel count (KTSE's Fig. 3 reading in the review).
SIZE_BINS = ("small", "medium", "large")
SMALL_BELOW, LARGE_ABOVE = 0.01, 0.10


def _same_shape(*arrays: np.ndarray) -> None:
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"maps must have one shape, got {sorted(shapes)}")


def size_bin(fraction: float) -> str:
    """``small`` below 1 % of the image, ``large`` above 10 %, ``medium`` in between (both ends included)."""
    if fraction < SMALL_BELOW:
        return "small"
    return "large" if fraction > LARGE_ABOVE else "medium"


def instance_recalls(pred: np.ndarray, gt: np.ndarray, instances: np.ndarray) -> list[dict[str, Any]]:
    """One row per GT instance (id > 0 in ``instances``): its class (the GT class of its pixels), ``area`` (its
    pixels with GT ≠ 255), ``hits`` (those predicted as its class), the area's ``fraction`` of the image and its
    size ``bin``. An instance with no valid pixel is left out. An instance whose pixels carry two GT classes is
    an error (instance maps and class maps disagree)."""
    _same_shape(pred, gt, instances)
    rows = []
    for instance_id in np.unique(instances):
        if instance_id <= 0:
            continue
        pixels = (instances == instance_id) & (gt != IGNORE)
        area = int(pixels.sum())
        if area == 0:
            continue
        classes = np.unique(gt[pixels])
        if len(classes) != 1 or classes[0] == 0:
            raise ValueError(f"instance {int(instance_id)} covers GT classes {classes.tolist()}, expected one "
                             f"foreground class")
        cls = int(classes[0])
        fraction = area / gt.size
        rows.append({"class": cls, "area": area, "hits": int((pred[pixels] == cls).sum()),
                     "fraction": fraction, "bin": size_bin(fraction)})
    return rows


def recall_by_size(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per size bin: instance count, mean of the per-instance recalls (the review's figure), and the pooled
    pixel recall Σ hits / Σ area beside it with its counts. ``None`` where a bin holds no instance."""
    out: dict[str, dict[str, float | int | None]] = {}
    rows = list(rows)
    for name in SIZE_BINS:
        members = [r for r in rows if r["bin"] == name]
        hits, area = sum(r["hits"] for r in members), sum(r["area"] for r in members)
        out[name] = {"instances": len(members), "hits": hits, "area": area,
                     "mean_recall": float(np.mean([r["hits"] / r["area"] for r in members])) if members else None,
                     "pixel_recall": hits / area if area else None}
    return out


def precision_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, 2)`` int64: per class c, [#(pred c ∧ GT c), #(pred c)] over pixels with GT ≠ 255.
    Prediction 255 (unsure) counts for no class."""
    _same_shape(pred, gt)
    valid = gt != IGNORE
    p, g = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
    committed = p != IGNORE
    p, g = p[committed], g[committed]
    if p.size and p.max() >= num_classes:
        raise ValueError(f"prediction label {int(p.max())} out of range [0, {num_classes})")
    predicted = np.bincount(p, minlength=num_classes)
    correct = np.bincount(p[p == g], minlength=num_classes)
    return np.stack([correct, predicted], axis=1)


def precision_summary(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Foreground precision per class (classes never predicted left out) and overall (Σ correct / Σ predicted
    over the foreground classes), with the counts."""
    counts = np.asarray(counts, np.int64)
    per_class = {class_names[c]: {"correct": int(counts[c, 0]), "predicted": int(counts[c, 1]),
                                  "precision": float(counts[c, 0] / counts[c, 1])}
                 for c in range(1, len(counts)) if counts[c, 1] > 0}
    correct, predicted = int(counts[1:, 0].sum()), int(counts[1:, 1].sum())
    return {"per_class": per_class, "correct": correct, "predicted": predicted,
            "precision": correct / predicted if predicted else None}


def agreement_confusion(y_crf: np.ndarray, y_ret: np.ndarray, gt: np.ndarray,
                        num_classes: int) -> tuple[np.ndarray, int, int]:
    """BANA's S = {Y_crf = Y_ret}: the confusion matrix (rows GT, columns Y_crf) of the pixels of S, |S| and
    N = #(GT ≠ 255). A pixel where both maps say 255 is not in S (nothing is committed there)."""
    _same_shape(y_crf, y_ret, gt)
    valid = gt != IGNORE
    agree = valid & (y_crf == y_ret) & (y_crf != IGNORE)
    target, pred = gt[agree].astype(np.int64), y_crf[agree].astype(np.int64)
    matrix = np.bincount(num_classes * target + pred, minlength=num_classes * num_classes)
    return matrix.reshape(num_classes, num_classes), int(agree.sum()), int(valid.sum())


def zero_cam_in_boxes(cams: np.ndarray, labels: Sequence[int], box_masks: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels inside at least one box whose CAM is ≤ 0 (0 after the ReLU of BANA's u_c) for
    every class of the boxes holding them (``cams`` (K, H, W) of ``labels``, ``box_masks`` (K, H, W) = pixels
    inside a box of ``labels[k]``)."""
    cams, box_masks = np.asarray(cams), np.asarray(box_masks, bool)
    if cams.shape != box_masks.shape or len(labels) != cams.shape[0]:
        raise ValueError(f"cams {cams.shape}, box masks {box_masks.shape} and {len(labels)} labels disagree")
    positive_in_box = ((cams > 0) & box_masks).any(axis=0)
    return box_masks.any(axis=0) & ~positive_in_box


def zero_cam_outcome(zero: np.ndarray, y_crf: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """On the in-box CAM = 0 pixels with GT ≠ 255: how many (``pixels``), how many Y_crf makes background
    (``background``), how many it gets right (``correct``), and how many are GT background (``gt_background``)."""
    _same_shape(zero, y_crf, gt)
    pixels = np.asarray(zero, bool) & (gt != IGNORE)
    return {"pixels": int(pixels.sum()), "background": int((pixels & (y_crf == 0)).sum()),
            "correct": int((pixels & (y_crf == gt)).sum()), "gt_background": int((pixels & (gt == 0)).sum())}

