"""ConfusionMatrix / mIoU against an independent computation and a hand-worked example."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from wsss_ray.maths.metrics import ConfusionMatrix, mask_miou


def _reference_scores(targets: list[np.ndarray], preds: list[np.ndarray], n: int) -> tuple[np.ndarray, float]:
    """sklearn confusion matrix + IoU formula, with the same ignore rules spelled out independently."""
    t = np.concatenate([x.ravel() for x in targets])
    p = np.concatenate([x.ravel() for x in preds])
    valid = t != 255
    t, p = t[valid], p[valid]
    p = np.where(p == 255, 0, p)  # unsure predictions count as background
    mat = sk_confusion_matrix(t, p, labels=list(range(n)))
    ious = []
    for c in range(n):
        tp = mat[c, c]
        fp = mat[:, c].sum() - tp
        fn = mat[c, :].sum() - tp
        ious.append(np.nan if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return mat, float(np.nanmean(ious))


def test_matches_sklearn_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    n = 6
    targets, preds = [], []
    for _ in range(5):
        h, w = rng.integers(5, 40, size=2)
        t = rng.integers(0, n - 1, size=(h, w))  # class n-1 never in target: tests FP-only classes
        t[rng.random((h, w)) < 0.1] = 255
        p = np.where(rng.random((h, w)) < 0.6, t, rng.integers(0, n, size=(h, w)))
        p[rng.random((h, w)) < 0.05] = 255
        targets.append(t.astype(np.uint8))
        preds.append(p.astype(np.uint8))
    cm = ConfusionMatrix(n)
    for t, p in zip(targets, preds):
        cm.update(t, p)
    ref_mat, ref_miou = _reference_scores(targets, preds, n)
    np.testing.assert_array_equal(cm.mat, ref_mat)
    assert cm.mat.dtype == np.int64
    assert cm.miou() == pytest.approx(ref_miou)
    assert mask_miou(targets, preds, n) == pytest.approx(ref_miou)
    # merging partial matrices equals one pass
    a, b = ConfusionMatrix(n), ConfusionMatrix(n)
    for i, (t, p) in enumerate(zip(targets, preds)):
        (a if i % 2 else b).update(t, p)
    np.testing.assert_array_equal((a + b).mat, cm.mat)
    np.testing.assert_array_equal(a.merge(b).mat, cm.mat)


def test_hand_worked_example() -> None:
    # target          pred
    # 0 0 1           0 1 1
    # 2 2 255         2 0 1      (255 in target: ignored, whatever the prediction)
    target = np.array([[0, 0, 1], [2, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 0, 1]])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    # counted pairs (t,p): (0,0) (0,1) (1,1) (2,2) (2,0)
    np.testing.assert_array_equal(cm.mat, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    # class 0: TP 1, FP 1 (t2->p0), FN 1 (t0->p1) -> 1/3
    # class 1: TP 1, FP 1 (t0->p1), FN 0          -> 1/2
    # class 2: TP 1, FP 0,          FN 1 (t2->p0) -> 1/2
    np.testing.assert_allclose(cm.iou(), [1 / 3, 1 / 2, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_none_in_dict() -> None:
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))
    ious = cm.iou()
    # class 0: TP 2, FP 1 -> 2/3; class 1: TP 1, FN 1 -> 1/2; classes 2, 3 absent everywhere -> NaN
    np.testing.assert_allclose(ious[:2], [2 / 3, 1 / 2])
    assert np.isnan(ious[2:]).all()
    assert cm.miou() == pytest.approx((2 / 3 + 1 / 2) / 2)
    scores = cm.to_dict(["bg", "cat", "dog", "cow"])
    assert scores["per_class"] == {"bg": pytest.approx(2 / 3), "cat": 0.5, "dog": None, "cow": None}
    json.dumps(scores, allow_nan=False)  # strictly JSON (no NaN)
    empty = ConfusionMatrix(2)
    assert np.isnan(empty.miou()) and empty.to_dict(["a", "b"])["miou"] is None


def test_ignore_handling() -> None:
    cm = ConfusionMatrix(3)
    # target 255 is skipped even when the prediction is an object
    cm.update(np.array([255, 255]), np.array([2, 255]))
    assert cm.mat.sum() == 0
    # prediction 255 (an unsure pseudo-mask pixel) is scored as background
    cm.update(np.array([1, 0]), np.array([255, 255]))
    np.testing.assert_array_equal(cm.mat, [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    custom = ConfusionMatrix(3, ignore_index=9)
    custom.update(np.array([9, 1]), np.array([1, 9]))
    np.testing.assert_array_equal(custom.mat, [[0, 0, 0], [1, 0, 0], [0, 0, 0]])


def test_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="target label 3 out of range"):
        cm.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="prediction label 7 out of range"):
        cm.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="out of range"):
        cm.update(np.array([-1]), np.array([0]))
    with pytest.raises(ValueError, match="class names"):
        cm.to_dict(["only-one"])
    with pytest.raises(ValueError):
        cm.merge(ConfusionMatrix(4))
    assert cm.mat.sum() == 0  # failed updates add nothing
