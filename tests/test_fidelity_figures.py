"""The robust-training bench's mechanism figures (bench/fidelity_figures.py) on hand-counted 3×3 maps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fidelity_figures as ff

X = 255


def test_correction_counts_changed_ignored_kept_and_fresh() -> None:
    gt = np.array([[0, 0, 1], [1, 1, X], [2, 2, 0]])
    old = np.array([[0, 1, 1], [2, 1, 1], [X, 0, 2]])
    new = np.array([[0, 0, X], [1, X, 0], [2, 0, 0]])
    c = ff.correction_counts(old, new, gt)
    # valid: every pixel but (1,2) → 8. labelled (old ≠ 255 on valid): all 8 but (2,0) → 7.
    # old right on labelled: (0,0) (0,2) (1,1) → 3; wrong: (0,1) (1,0) (2,1) (2,2) → 4.
    # changed (new ≠ 255, new ≠ old): (0,1) 1→0, (1,0) 2→1, (2,2) 2→0 → 3; new right: all 3; old right: none.
    # ignored (new = 255): (0,2) old right, (1,1) old right → 2, old wrong 0.
    # kept (new ≠ 255): (0,0) (0,1) (1,0) (2,1) (2,2) → 5; right: (0,0) (0,1) (1,0) (2,2) → 4 ((2,1) 0 vs 2).
    # fresh (old 255 → labelled): (2,0) new 2 = GT → 1 right.
    assert c == {"valid": 8, "labelled": 7, "old_correct": 3, "old_wrong": 4, "changed": 3,
                 "changed_new_correct": 3, "changed_old_correct": 0, "ignored": 2, "ignored_old_wrong": 0,
                 "kept": 5, "kept_correct": 4, "fresh": 1, "fresh_correct": 1}
    f = ff.correction_figures(c)
    assert f["prec_new"] == 1.0 and f["prec_old"] == 0.0
    assert f["changed_share"] == pytest.approx(3 / 8)
    assert f["noise_precision"] == 0.0 and f["noise_recall"] == 0.0
    assert f["kept_precision"] == pytest.approx(4 / 5) and f["old_precision"] == pytest.approx(3 / 7)


def test_correction_figures_of_an_empty_set_are_nan_not_zero() -> None:
    same = np.array([[1, 1], [0, 0]])
    f = ff.correction_figures(ff.correction_counts(same, same, same))
    assert math.isnan(f["prec_new"]) and math.isnan(f["noise_precision"])
    assert f["kept_precision"] == 1.0


def test_nnss_noise_detection_precision_and_recall() -> None:
    gt = np.array([[1, 1, 1], [0, 0, 0], [2, 2, 2]])
    old = np.array([[1, 0, 0], [0, 1, 0], [2, 2, 1]])  # wrong: (0,1) (0,2) (1,1) (2,2) → 4
    new = np.array([[X, X, 0], [0, X, 0], [2, 2, X]])  # ignored: (0,0) right, (0,1) wrong, (1,1) wrong, (2,2) wrong
    c = ff.correction_counts(old, new, gt)
    assert (c["ignored"], c["ignored_old_wrong"], c["old_wrong"]) == (4, 3, 4)
    f = ff.correction_figures(c)
    assert f["noise_precision"] == pytest.approx(3 / 4) and f["noise_recall"] == pytest.approx(3 / 4)
    # kept: (0,2) wrong, (1,0) (1,2) (2,0) (2,1) right → 4/5; overall old precision 5/9.
    assert f["kept_precision"] == pytest.approx(4 / 5) and f["old_precision"] == pytest.approx(5 / 9)


def test_add_and_sum_counts() -> None:
    assert ff.add_counts({"a": 1}, {"a": 2, "b": 3}) == {"a": 3, "b": 3}
    assert ff.sum_counts([{"a": 1}, {"a": 1}, {"b": 1}]) == {"a": 2, "b": 1}


def test_nal_input_counts() -> None:
    gt = np.array([[0, 0, 1], [1, 1, X], [2, 2, 0]])
    y_crf = np.array([[0, 1, 1], [1, 0, 1], [X, 2, 0]])
    y_ret = np.array([[0, 0, 1], [X, 0, 1], [2, 1, 1]])
    c = ff.nal_input_counts(y_crf, y_ret, gt)
    # labelled: valid (not (1,2)) and y_crf ≠ 255 (not (2,0)) → 7; agree: (0,0) (0,2) (1,1) → 3, right (0,0) (0,2).
    # disagree: (0,1) wrong, (1,0) right, (2,1) right, (2,2) right.
    assert c == {"labelled": 7, "agree": 3, "agree_correct": 2, "disagree": 4, "disagree_correct": 3}


def test_score_histograms_and_auc_by_hand() -> None:
    gt = np.array([[0, 0, 0, 0, 1]])
    y_crf = np.array([[0, 0, 1, 1, 1]])
    y_ret = np.array([[1, 1, 0, 0, 1]])  # last pixel agrees: not in ~S
    score = np.array([[0.9, 0.3, 0.3, 0.1, 0.0]])
    h_pos, h_neg = ff.score_histograms(score, y_crf, y_ret, gt, bins=10)
    # positives (y_crf = gt on ~S): 0.9 → bin 9, 0.3 → bin 3; negatives: 0.3 → bin 3, 0.1 → bin 1.
    assert h_pos.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    assert h_neg.tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    # pairs (pos, neg): (0.9, 0.3) 1, (0.9, 0.1) 1, (0.3, 0.3) ½, (0.3, 0.1) 1 → 3.5 / 4.
    assert ff.auc_from_histograms(h_pos, h_neg) == pytest.approx(3.5 / 4)
    assert ff.auc_from_histograms(h_neg, h_pos) == pytest.approx(0.5 / 4)
    assert math.isnan(ff.auc_from_histograms(h_pos, np.zeros(10)))


def test_nal_scores_sigma_and_softmax() -> None:
    # Two classes, two pixels. Pixel 0: cos = (1, 0) → D = (2, 1); pixel 1: cos = (r, −r), r = 1/√2.
    r = 1 / np.sqrt(2)
    cosine = np.array([[[1.0, r]], [[0.0, -r]]])  # (C=2, H=1, W=2)
    logits = np.array([[[0.0, 1.0]], [[np.log(3.0), 1.0]]])  # pixel 0: p = (1/4, 3/4); pixel 1: (1/2, 1/2)
    y_crf = np.array([[1, 1]])
    s = ff.nal_scores(logits, cosine, y_crf, gamma=2.0)
    # c* = 1: pixel 0 (1/2)² = 1/4; pixel 1 ((1 − r)/(1 + r))².
    assert s["sigma"][0].tolist() == pytest.approx([0.25, ((1 - r) / (1 + r)) ** 2])
    assert s["max_softmax"][0].tolist() == pytest.approx([0.75, 0.5])
    assert s["p_star"][0].tolist() == pytest.approx([0.75, 0.5])
    s0 = ff.nal_scores(logits, cosine, np.array([[0, 0]]), gamma=2.0)
    assert s0["sigma"][0].tolist() == pytest.approx([1.0, 1.0]) and s0["p_star"][0].tolist() == pytest.approx(
        [0.25, 0.5])


def test_mspn_clean_counts_per_threshold() -> None:
    gt = np.array([[0, 0, 1], [1, 1, X], [2, 2, 0]])
    majority = np.array([[0, 1, 1], [1, 0, 1], [X, 2, 0]])
    agreement = np.array([[6, 3, 5], [4, 6, 6], [0, 2, 3]])
    c4 = ff.mspn_clean_counts(majority, agreement, gt, 4)
    # voted on valid: all but (1,2) and (2,0) → 7. agreement ≥ 4: (0,0) ok, (0,2) ok, (1,0) ok, (1,1) wrong → 4/3.
    # noisy: (0,1) wrong, (2,1) ok, (2,2) ok → 3/2.
    assert c4 == {"valid": 8, "clean": 4, "clean_correct": 3, "noisy": 3, "noisy_correct": 2}
    c6 = ff.mspn_clean_counts(majority, agreement, gt, 6)
    assert (c6["clean"], c6["clean_correct"], c6["noisy"], c6["noisy_correct"]) == (2, 1, 5, 4)


def test_negative_target_counts_per_reading() -> None:
    label_list = [0, 3]  # bit 0 = class 0, bit 1 = class 3; classes 1, 2 excluded (4 classes)
    gt = np.array([[0, 3, 3]])
    majority = np.array([[0, 0, 3]])
    agreement = np.array([[2, 2, 6]])  # t = 4: pixels 0 and 1 noisy, pixel 2 clean
    proposed = np.array([[0b11, 0b11, 0b10]])
    c = ff.negative_target_counts(majority, agreement, proposed, label_list, gt, 4, 4)
    # proposed pairs: (p0, 0) wrong negative, (p0, 3) right, (p1, 0) right, (p1, 3) wrong → 4 / 2 right.
    # minority (≠ majority 0): (p0, 3) right, (p1, 3) wrong → 2 / 1.
    # excluded tags: classes 1, 2 at both noisy pixels → 4 pairs, all right (GT is 0 or 3).
    assert c == {"proposed_pairs": 4, "proposed_right": 2, "minority_pairs": 2, "minority_right": 1,
                 "excluded_tags_pairs": 4, "excluded_tags_right": 4}


def test_rectification_counts() -> None:
    gt = np.array([[0, 0, 1], [1, 1, X], [2, 2, 0]])
    target = np.array([[0, 1, 1], [2, X, 1], [2, 0, 0]])
    prediction = np.array([[1, 0, 1], [2, 1, 0], [2, 2, 0]])
    c = ff.rectification_counts(prediction, target, gt)
    # labelled: all but (1,1) (target 255) and (1,2) (GT 255) → 7. wrong: (0,1) (1,0) (2,1) → 3, prediction
    # right at (0,1) and (2,1) → 2. right: (0,0) (0,2) (2,0) (2,2) → 4, kept at (0,2) (2,0) (2,2) → 3.
    assert c == {"target_wrong": 3, "rectified": 2, "target_right": 4, "kept": 3}
