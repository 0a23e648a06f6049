"""Stage ``train_seg``: DeepLab trained on the pseudo-masks with DDP on Ray Train and Ray Data ingest."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import ray

from wsss_ray.config import AugmentConfig, SegTrainConfig
from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.data.transforms import random_scale_crop_flip
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.progress import log
from wsss_ray.stage_dir import StageDir
from wsss_ray.training.common import export_model, fit, steps_per_epoch
from wsss_ray.training.losses import SEGMENTATION_LOSSES


def segmentation_sample(row: dict[str, Any], augment: AugmentConfig) -> dict[str, Any]:
    """Ray Data map: the image and its pseudo-mask, scaled, cropped and flipped together."""
    image, label = random_scale_crop_flip(read_image(row["image_uri"]), read_label(row["label_uri"]),
                                          augment.crop_size, (augment.scale_min, augment.scale_max), augment.flip,
                                          np.random.default_rng())
    return {"image": image, "label": label}


def val_sample(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: a val image and its ground truth, unaugmented."""
    return {"image": read_image(row["image_uri"]), "label": read_label(row["mask_uri"])}


def train_segmentation(records: list[dict[str, Any]], stage: StageDir, config: SegTrainConfig,
                       num_classes: int, val_records: list[dict[str, Any]] | None = None,
                       callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train on rows carrying ``image_uri`` and ``label_uri`` (the pseudo-mask); export ``model.pt``.

    With ``val_records`` (manifest rows with ground truth) and ``config.val_every`` > 0, val mIoU is measured
    during training and reported with the epoch's metrics (curves in the report; what Tune's schedulers read).
    """
    workers = config.workers.num_workers
    batch_size, steps = steps_per_epoch(len(records), config.batch_size, workers)
    log("train_seg", f"{len(records)} images, {workers} workers × batch {batch_size}, {steps} steps/epoch, "
                     f"{config.epochs} epochs → {stage.uri}")
    datasets = {"train": ray.data.from_items(records).map(segmentation_sample, fn_kwargs={"augment": config.augment})}
    val = [r for r in val_records or [] if r["mask_uri"]]
    if val and config.val_every:
        datasets["val"] = ray.data.from_items(val).map(val_sample)
    loop = {"config": config, "build_model": partial(build_segmentation_model, config.model, num_classes),
            "loss": SEGMENTATION_LOSSES[config.loss.name](config.loss), "target": "label",
            "batch_size": batch_size, "steps_per_epoch": steps, "num_classes": num_classes,
            "val_every": config.val_every if "val" in datasets else 0}
    result = fit(loop, config.workers, datasets, stage, callbacks)
    return {**export_model(result, stage), "images": len(records)}
