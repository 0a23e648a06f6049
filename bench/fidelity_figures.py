"""Mechanism figures of the noise-robust training bench (``bench/robust_training.py``), as pure functions.

Definitions: docs/fidelity-review.md, "Fidelity benchmark — mechanism figures". Every figure counts pixels (not
per-image means) so counts from many crops or images add up (:func:`add_counts`), ignores GT = 255 in numerator
and denominator, and is returned as integer counts; :func:`ratio` turns two counts into a figure (NaN when the
denominator is empty). Label maps are integer arrays of one shape, 255 = ignore.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

IGNORE = 255
BINS = 1024

Counts = dict[str, int]


def ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, NaN for an empty denominator (a figure of nothing is not 0)."""
    return float(numerator) / denominator if denominator else float("nan")


def add_counts(total: Counts, counts: Counts) -> Counts:
    """``total`` + ``counts`` key by key (a new dict; missing keys count 0)."""
    return {key: int(total.get(key, 0)) + int(counts.get(key, 0)) for key in {*total, *counts}}


def _n(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


# ------------------------------------------------------------------------------------------------- OuT


def correction_counts(old: np.ndarray, new: np.ndarray, gt: np.ndarray) -> Counts:
    """OuT: what a correction step did to the pseudo-mask ``old`` (→ ``new``), scored against ``gt``.

    On valid pixels (GT ≠ 255): the changed set X = {old ≠ 255, new ≠ 255, new ≠ old} with how many of its new
    and of its old labels are right; the ignored set I = {old ≠ 255, new = 255} (NNSS) with how many of its old
    labels were wrong (noise found); the kept pixels K = {old ≠ 255, new ≠ 255} with how many are right; the
    newly labelled pixels {old = 255, new ≠ 255}; and the pseudo-mask's own correct / wrong pixel counts.
    """
    old, new, gt = np.asarray(old), np.asarray(new), np.asarray(gt)
    valid = gt != IGNORE
    labelled = valid & (old != IGNORE)
    changed = labelled & (new != IGNORE) & (new != old)
    ignored = labelled & (new == IGNORE)
    kept = labelled & (new != IGNORE)
    fresh = valid & (old == IGNORE) & (new != IGNORE)
    return {"valid": _n(valid), "labelled": _n(labelled), "old_correct": _n(labelled & (old == gt)),
            "old_wrong": _n(labelled & (old != gt)), "changed": _n(changed),
            "changed_new_correct": _n(changed & (new == gt)), "changed_old_correct": _n(changed & (old == gt)),
            "ignored": _n(ignored), "ignored_old_wrong": _n(ignored & (old != gt)), "kept": _n(kept),
            "kept_correct": _n(kept & (new == gt)), "fresh": _n(fresh), "fresh_correct": _n(fresh & (new == gt))}


def correction_figures(c: Counts) -> dict[str, float]:
    """Ratios of :func:`correction_counts` (summed over an epoch's crops)."""
    return {"prec_new": ratio(c["changed_new_correct"], c["changed"]),
            "prec_old": ratio(c["changed_old_correct"], c["changed"]),
            "changed_share": ratio(c["changed"], c["valid"]),
            "noise_precision": ratio(c["ignored_old_wrong"], c["ignored"]),
            "noise_recall": ratio(c["ignored_old_wrong"], c["old_wrong"]),
            "ignored_share": ratio(c["ignored"], c["valid"]),
            "kept_precision": ratio(c["kept_correct"], c["kept"]),
            "old_precision": ratio(c["old_correct"], c["labelled"]),
            "fresh_precision": ratio(c["fresh_correct"], c["fresh"])}


# ------------------------------------------------------------------------------------------------- NAL


def nal_input_counts(y_crf: np.ndarray, y_ret: np.ndarray, gt: np.ndarray) -> Counts:
    """BANA's two sets on pixels labelled in Y_crf with GT ≠ 255: S = {Y_crf = Y_ret}, ~S the rest (Y_ret = 255
    included, as NAL's loss has it), and how many of each Y_crf labels right."""
    y_crf, y_ret, gt = np.asarray(y_crf), np.asarray(y_ret), np.asarray(gt)
    labelled = (gt != IGNORE) & (y_crf != IGNORE)
    agree = labelled & (y_crf == y_ret)
    disagree = labelled & ~agree
    return {"labelled": _n(labelled), "agree": _n(agree), "agree_correct": _n(agree & (y_crf == gt)),
            "disagree": _n(disagree), "disagree_correct": _n(disagree & (y_crf == gt))}


def score_histograms(score: np.ndarray, y_crf: np.ndarray, y_ret: np.ndarray, gt: np.ndarray,
                     bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """(h_pos, h_neg): ``bins``-bin histograms over [0, 1] of a per-pixel confidence ``score`` on ~S (see
    :func:`nal_input_counts`), positive = Y_crf is right (Y_crf = GT). Bin b holds [b/bins, (b+1)/bins), 1.0 in
    the last bin; scores outside [0, 1] are clipped."""
    y_crf, y_ret, gt = np.asarray(y_crf), np.asarray(y_ret), np.asarray(gt)
    disagree = (gt != IGNORE) & (y_crf != IGNORE) & (y_crf != y_ret)
    index = np.clip((np.clip(np.asarray(score, np.float64), 0.0, 1.0) * bins).astype(np.int64), 0, bins - 1)
    positive = disagree & (y_crf == gt)
    negative = disagree & (y_crf != gt)
    return (np.bincount(index[positive], minlength=bins).astype(np.int64),
            np.bincount(index[negative], minlength=bins).astype(np.int64))


def auc_from_histograms(h_pos: np.ndarray, h_neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(same bin):
    Σ_b h_neg(b)·(H_pos(> b) + ½ h_pos(b)) / (N_pos·N_neg); NaN without positives or negatives."""
    h_pos, h_neg = np.asarray(h_pos, np.float64), np.asarray(h_neg, np.float64)
    n_pos, n_neg = h_pos.sum(), h_neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    above = h_pos[::-1].cumsum()[::-1] - h_pos  # H_pos(> b): positives in bins after b
    return float((h_neg * (above + 0.5 * h_pos)).sum() / (n_pos * n_neg))


def nal_scores(logits: np.ndarray, cosine: np.ndarray, y_crf: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """Per-pixel confidences of a segmenter's prediction for Y_crf's label c*, all (C, H, W) / (H, W) at one
    resolution: σ = (D_c*/max_c D_c)^γ with D_c = 1 + cos(φ, W_c) (BANA Eqs. 11-12; ``cosine`` = cos(φ, W_c),
    computed and resized as the loss does), the max softmax probability, and the softmax probability of c*."""
    logits, cosine = np.asarray(logits, np.float64), np.asarray(cosine, np.float64)
    correlation = 1.0 + cosine
    star = np.where(np.asarray(y_crf) == IGNORE, 0, np.asarray(y_crf)).astype(np.int64)[None]
    d_star = np.take_along_axis(correlation, star, axis=0)[0]
    sigma = (d_star / np.maximum(correlation.max(axis=0), 1e-12)) ** gamma
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    probs = shifted / shifted.sum(axis=0, keepdims=True)
    return {"sigma": sigma, "max_softmax": probs.max(axis=0), "p_star": np.take_along_axis(probs, star, axis=0)[0]}


# ------------------------------------------------------------------------------------------------- MSPN


def mspn_clean_counts(majority: np.ndarray, agreement: np.ndarray, gt: np.ndarray, t: int) -> Counts:
    """MSPN's split of the seed vote at agreement threshold ``t``, on GT ≠ 255: clean = {majority ≠ 255,
    agreement ≥ t}, noisy = {majority ≠ 255, agreement < t}, each with how many majorities are right."""
    majority, agreement, gt = np.asarray(majority), np.asarray(agreement), np.asarray(gt)
    valid = gt != IGNORE
    voted = valid & (majority != IGNORE)
    clean = voted & (agreement >= t)
    noisy = voted & (agreement < t)
    return {"valid": _n(valid), "clean": _n(clean), "clean_correct": _n(clean & (majority == gt)),
            "noisy": _n(noisy), "noisy_correct": _n(noisy & (majority == gt))}


def negative_target_counts(majority: np.ndarray, agreement: np.ndarray, proposed: np.ndarray,
                           label_list: Sequence[int], gt: np.ndarray, t: int, num_classes: int) -> Counts:
    """MSPN's negative-learning targets on the noisy pixels (GT ≠ 255) for each reading of the paper's rule
    (``methods.mspn.losses.negative_sets``), as (pixel, label) pairs and how many of them are right negatives
    (label ≠ GT): ``minority`` = proposed labels other than the majority, ``proposed`` = every proposed label,
    ``excluded_tags`` = the classes outside the image's ``label_list``. ``proposed`` is the stored bitmask (bit k
    = a seed proposed ``label_list[k]``)."""
    majority, gt = np.asarray(majority), np.asarray(gt)
    bits = np.asarray(proposed).astype(np.int64)
    noisy = (gt != IGNORE) & (majority != IGNORE) & (np.asarray(agreement) < t)
    counts = {f"{reading}_{part}": 0 for reading in ("minority", "proposed", "excluded_tags")
              for part in ("pairs", "right")}
    for k, label in enumerate(label_list):
        pairs = noisy & (((bits >> k) & 1) == 1)
        right = pairs & (gt != label)
        counts["proposed_pairs"] += _n(pairs)
        counts["proposed_right"] += _n(right)
        counts["minority_pairs"] += _n(pairs & (majority != label))
        counts["minority_right"] += _n(right & (majority != label))
    for label in sorted(set(range(num_classes)) - {int(v) for v in label_list}):
        counts["excluded_tags_pairs"] += _n(noisy)
        counts["excluded_tags_right"] += _n(noisy & (gt != label))
    return counts


# ------------------------------------------------------------------------------------------------- CDSP / all


def rectification_counts(prediction: np.ndarray, target: np.ndarray, gt: np.ndarray) -> Counts:
    """How a segmenter trained on ``target`` (Ω̃, the noisy training map) relates to it on GT ≠ 255 pixels:
    where the target is wrong (≠ 255, ≠ GT), how many the prediction gets right (rectified); where it is right,
    how many the prediction keeps right."""
    prediction, target, gt = np.asarray(prediction), np.asarray(target), np.asarray(gt)
    labelled = (gt != IGNORE) & (target != IGNORE)
    wrong, right = labelled & (target != gt), labelled & (target == gt)
    return {"target_wrong": _n(wrong), "rectified": _n(wrong & (prediction == gt)),
            "target_right": _n(right), "kept": _n(right & (prediction == gt))}


def sum_counts(parts: Iterable[Counts]) -> Counts:
    """The key-by-key sum of many :func:`correction_counts`-like dicts."""
    total: Counts = {}
    for part in parts:
        total = add_counts(total, part)
    return total
