"""Per-run figure collection of ``bench/classifier_quality.py``: CAMs of a trained classifier over the train split,
summed into the pure counts of ``bench/cam_figures.py``.

The CAMs are recomputed here with the generator's own settings (the stage stores label maps, not CAMs, and the
bg-score sweep needs the CAMs); the label maps Y_crf / Y_ret are read from the stage's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from cam_figures import (
    agreement_confusion,
    instance_recalls,
    precision_counts,
    precision_summary,
    recall_by_size,
    zero_cam_in_boxes,
    zero_cam_outcome,
)

from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.data.toy import render_image
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.maths.crf import threshold_cams
from wsss_ray.maths.inference import multiscale_cams
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.bana.boxes import boxes_array, class_box_masks

NUM_CLASSES = 21
MAX_OBJECTS = 3  # make_toy_dataset's default, which the bench uses


def ground_truth(records: list[dict[str, Any]], size: int, num_classes: int,
                 data_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per image id: (GT class map, GT instance map). The VOC writer stores no SegmentationObject, so the
    instances are re-rendered from the dataset seed (the toy sample is a function of (seed, index)); the
    re-rendered class map must equal the stored mask, which pins the two to the same sample."""
    truth = {}
    for record in records:
        index = int(record["image_id"].rsplit("_", 1)[1]) - 1  # 2007_000001 is sample 0
        _, labels, instances, _, _ = render_image(np.random.default_rng([data_seed, index]), size, num_classes,
                                                  MAX_OBJECTS)
        gt = read_label(record["mask_uri"])
        if not np.array_equal(gt, labels):
            raise RuntimeError(f"{record['mask_uri']}: the re-rendered sample {index} differs from the stored mask")
        truth[record["image_id"]] = (gt, instances)
    return truth


def _figures(confusion: ConfusionMatrix, precision: np.ndarray, instances: list[dict[str, Any]]) -> dict[str, Any]:
    return {"seed_miou": confusion.miou(), "precision": precision_summary(precision, VOC_CLASSES),
            "recall": recall_by_size(instances)}


@torch.no_grad()
def tag_figures(model: torch.nn.Module, records: list[dict[str, Any]],
                truth: dict[str, tuple[np.ndarray, np.ndarray]], scales: Sequence[float],
                bg_sweep: Sequence[float], bg_common: float) -> dict[str, Any]:
    """Seed mIoU for every bg score of the sweep; KTSE's figures (instance recall by size, foreground
    precision) at the common bg score and at the sweep's best one (ties: the lower score)."""
    if bg_common not in bg_sweep:
        raise ValueError(f"the common bg score {bg_common} must be one of the sweep {list(bg_sweep)}")
    confusions = {bg: ConfusionMatrix(NUM_CLASSES) for bg in bg_sweep}
    precisions = {bg: np.zeros((NUM_CLASSES, 2), np.int64) for bg in bg_sweep}
    instances: dict[float, list[dict[str, Any]]] = {bg: [] for bg in bg_sweep}
    for record in records:
        image, tags = read_image(record["image_uri"]), weak_tags(record, "tags")
        gt, instance_map = truth[record["image_id"]]
        cams = multiscale_cams(model, image, tags, scales, True)
        for bg in bg_sweep:
            seed = threshold_cams(cams, tags, bg)
            confusions[bg].update(gt, seed)
            precisions[bg] += precision_counts(seed, gt, NUM_CLASSES)
            instances[bg] += instance_recalls(seed, gt, instance_map)
    sweep = {bg: confusions[bg].miou() for bg in bg_sweep}
    best = max(bg_sweep, key=lambda bg: (sweep[bg], -bg))
    return {"sweep": sweep, "best_bg": best,
            "common": _figures(confusions[bg_common], precisions[bg_common], instances[bg_common]),
            "best": _figures(confusions[best], precisions[best], instances[best]),
            "instances": instances[bg_common]}


@torch.no_grad()
def box_figures(model: torch.nn.Module, records: list[dict[str, Any]],
                truth: dict[str, tuple[np.ndarray, np.ndarray]], stage: StageDir, scales: Sequence[float],
                flip: bool) -> dict[str, Any]:
    """BANA's S = {Y_crf = Y_ret} (coverage, Y_crf's mIoU on S) and the in-box CAM = 0 pixels' fate in Y_crf,
    from the stage's Y_crf / Y_ret and the box generator's CAMs (its scales and flip)."""
    agree = ConfusionMatrix(NUM_CLASSES)
    covered = valid = 0
    zero = {"pixels": 0, "background": 0, "correct": 0, "gt_background": 0}
    in_box = 0
    for record in records:
        name = f"{record['image_id']}.png"
        y_crf, y_ret = read_label(stage.path("pseudo", name)), read_label(stage.path("retrieved", name))
        gt = truth[record["image_id"]][0]
        matrix, s, n = agreement_confusion(y_crf, y_ret, gt, NUM_CLASSES)
        agree.mat += matrix
        covered, valid = covered + s, valid + n
        image, labels = read_image(record["image_uri"]), weak_tags(record, "boxes")
        masks = class_box_masks(boxes_array(record.get("boxes")), labels, gt.shape)
        in_box += int((masks.any(axis=0) & (gt != 255)).sum())
        outcome = zero_cam_outcome(zero_cam_in_boxes(multiscale_cams(model, image, labels, scales, flip), labels,
                                                     masks), y_crf, gt)
        zero = {k: zero[k] + outcome[k] for k in zero}
    return {"agree_pixels": covered, "valid_pixels": valid, "coverage": covered / max(valid, 1),
            "agree_miou": agree.miou(), "in_box_pixels": in_box, "zero_cam": zero,
            "zero_share": zero["pixels"] / max(in_box, 1),
            "zero_to_background": zero["background"] / zero["pixels"] if zero["pixels"] else None,
            "zero_precision": zero["correct"] / zero["pixels"] if zero["pixels"] else None}
