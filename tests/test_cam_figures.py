"""bench/cam_figures.py: the KTSE and BANA mechanism figures on hand-counted tiny maps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cam_figures import (  # bench/ is not a package
    agreement_confusion,
    instance_recalls,
    precision_counts,
    precision_summary,
    recall_by_size,
    size_bin,
    zero_cam_in_boxes,
    zero_cam_outcome,
)

# A 4×4 image: instance 1 (class 1) is the top-left 2×2 block with one pixel ignored, instance 2 (class 2) the
# right column, instance 3 (class 1) the single pixel (3, 0).
GT = np.array([[1, 1, 0, 2],
               [1, 255, 0, 2],
               [0, 0, 0, 2],
               [1, 0, 0, 2]], np.uint8)
INSTANCES = np.array([[1, 1, 0, 2],
                      [1, 1, 0, 2],
                      [0, 0, 0, 2],
                      [3, 0, 0, 2]], np.int32)
PRED = np.array([[1, 0, 1, 2],
                 [1, 2, 0, 2],
                 [0, 0, 0, 0],
                 [0, 0, 255, 1]], np.uint8)


def test_size_bins_cut_at_1_and_10_percent() -> None:
    assert [size_bin(f) for f in (0.0099, 0.01, 0.1, 0.1001)] == ["small", "medium", "medium", "large"]


def test_instance_recalls_count_valid_pixels_of_the_instance() -> None:
    rows = instance_recalls(PRED, GT, INSTANCES)
    # instance 1: valid pixels (0,0) (0,1) (1,0) -> area 3 (the 255 pixel is out); predicted 1 at (0,0), (1,0).
    # instance 2: (0..3, 3), area 4; predicted 2 at rows 0 and 1. instance 3: (3,0), predicted 0.
    assert [(r["class"], r["area"], r["hits"]) for r in rows] == [(1, 3, 2), (2, 4, 2), (1, 1, 0)]
    assert [r["fraction"] for r in rows] == [3 / 16, 4 / 16, 1 / 16]
    assert [r["bin"] for r in rows] == ["large", "large", "medium"]  # 1/16 = 6.25 %


def test_recall_by_size_means_instances_and_pools_pixels() -> None:
    rows = [{"bin": "large", "area": 3, "hits": 2}, {"bin": "large", "area": 4, "hits": 2},
            {"bin": "small", "area": 1, "hits": 0}]
    out = recall_by_size(rows)
    assert out["large"] == {"instances": 2, "hits": 4, "area": 7, "mean_recall": pytest.approx((2 / 3 + 2 / 4) / 2),
                            "pixel_recall": pytest.approx(4 / 7)}
    assert out["small"]["mean_recall"] == 0.0 and out["small"]["pixel_recall"] == 0.0
    assert out["medium"] == {"instances": 0, "hits": 0, "area": 0, "mean_recall": None, "pixel_recall": None}


def test_instance_with_two_gt_classes_is_an_error() -> None:
    gt = np.array([[1, 2]], np.uint8)
    with pytest.raises(ValueError, match="instance 1 covers GT classes"):
        instance_recalls(np.zeros((1, 2), np.uint8), gt, np.array([[1, 1]], np.int32))


def test_precision_counts_skip_ignored_gt_and_unsure_predictions() -> None:
    counts = precision_counts(PRED, GT, 3)
    # Valid pixels (GT != 255): 15; the prediction 255 at (3,2) commits to nothing.
    # pred 0: (0,1) GT 1, (1,2), (2,0), (2,1), (2,2), (2,3) GT 2, (3,0) GT 1, (3,1) -> 8 predicted, 5 correct
    # pred 1: (0,0) ok, (0,2) GT 0, (1,0) ok, (3,3) GT 2 -> 4 predicted, 2 correct; pred 2 at (1,1) is ignored GT
    # pred 2: (0,3), (1,3) -> 2 predicted, 2 correct
    assert counts.tolist() == [[5, 8], [2, 4], [2, 2]]
    summary = precision_summary(counts, ["background", "a", "b"])
    assert summary["correct"] == 4 and summary["predicted"] == 6
    assert summary["precision"] == pytest.approx(4 / 6)
    assert summary["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert summary["per_class"]["b"] == {"correct": 2, "predicted": 2, "precision": 1.0}


def test_precision_summary_without_foreground_predictions() -> None:
    summary = precision_summary(np.array([[3, 5], [0, 0]]), ["background", "a"])
    assert summary["per_class"] == {} and summary["precision"] is None


def test_agreement_confusion_counts_only_agreeing_committed_pixels() -> None:
    y_crf = np.array([[1, 1, 0], [0, 2, 255]], np.uint8)
    y_ret = np.array([[1, 0, 0], [0, 2, 255]], np.uint8)
    gt = np.array([[1, 1, 255], [2, 2, 0]], np.uint8)
    matrix, agree, valid = agreement_confusion(y_crf, y_ret, gt, 3)
    # Valid: 5 pixels (the 255 at (0,2) is out). Agreeing and committed: (0,0) GT1/1, (1,0) GT2/0, (1,1) GT2/2;
    # (0,1) disagrees, (1,2) is 255 in both.
    expected = np.zeros((3, 3), np.int64)
    expected[1, 1] = expected[2, 0] = expected[2, 2] = 1
    assert matrix.tolist() == expected.tolist()
    assert (agree, valid) == (3, 5)


def test_zero_cam_in_boxes_needs_zero_cam_for_every_class_holding_the_pixel() -> None:
    cams = np.array([[[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]],
                     [[0.0, 0.0, 0.7], [0.0, 0.3, 0.0]]], np.float32)
    boxes = np.array([[[1, 1, 0], [1, 1, 0]],      # class A's box: columns 0-1
                      [[0, 1, 1], [0, 1, 1]]], bool)  # class B's box: columns 1-2
    zero = zero_cam_in_boxes(cams, [1, 2], boxes)
    # (0,0) in A, CAM_A 0 -> zero. (0,1) in A and B, CAM_A 0.5 -> not. (0,2) in B, CAM_B 0.7 -> not.
    # (1,0) in A, 0 -> zero. (1,1) in A and B, CAM_B 0.3 -> not. (1,2) in B, CAM_B 0 -> zero.
    assert zero.tolist() == [[True, False, False], [True, False, True]]
    with pytest.raises(ValueError, match="disagree"):
        zero_cam_in_boxes(cams, [1], boxes)


def test_zero_cam_outcome_counts() -> None:
    zero = np.array([[True, True, False], [True, True, True]])
    y_crf = np.array([[0, 1, 0], [0, 0, 2]], np.uint8)
    gt = np.array([[0, 1, 0], [1, 255, 1]], np.uint8)
    # Zero and valid: (0,0) GT0/bg, (0,1) GT1/1, (1,0) GT1/bg, (1,2) GT1/2; (1,1) is ignored GT.
    assert zero_cam_outcome(zero, y_crf, gt) == {"pixels": 4, "background": 2, "correct": 2, "gt_background": 1}


def test_mean_std_and_verdict_rule() -> None:
    from classifier_report import mean_std, verdict

    # Sample std of (0.5, 0.6, 0.7) = sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1.
    mean, std = mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert mean_std([0.4, None]) == (0.4, mean_std([0.4])[1]) and np.isnan(mean_std([0.4])[1])
    # Reproduced only when the gap exceeds twice the larger std; the opposite direction is "reversed".
    assert verdict((0.9, 0.1), (0.6, 0.05)) == "reproduced"      # 0.3 > 0.2
    assert verdict((0.7, 0.1), (0.6, 0.05)) == "not separated"   # 0.1 < 0.2
    assert verdict((0.3, 0.01), (0.6, 0.1)) == "reversed"        # -0.3 < -0.2
    assert verdict((0.7, float("nan")), (0.6, 0.0)) == "n/a"     # one seed: no std
