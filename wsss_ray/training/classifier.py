"""Stage ``train_cls``: the CAM classifier, trained from image-level tags with DDP on Ray Train."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import ray

from wsss_ray.config import AugmentConfig, ClassifierTrainConfig
from wsss_ray.data.image_io import read_image
from wsss_ray.data.transforms import random_scale_crop_flip
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.models.classifier import CamClassifier
from wsss_ray.progress import log
from wsss_ray.stage_dir import StageDir
from wsss_ray.training.common import export_model, fit, steps_per_epoch
from wsss_ray.training.losses import CLASSIFIER_LOSSES


def classifier_sample(row: dict[str, Any], augment: AugmentConfig, num_foreground: int,
                      supervision: str) -> dict[str, Any]:
    """Ray Data map: one augmented crop and its multi-hot target over the foreground classes."""
    image, _ = random_scale_crop_flip(read_image(row["image_uri"]), None, augment.crop_size,
                                      (augment.scale_min, augment.scale_max), augment.flip, np.random.default_rng())
    target = np.zeros(num_foreground, np.float32)
    target[[t - 1 for t in weak_tags(row, supervision)]] = 1.0
    return {"image": image, "target": target}


def train_classifier(records: list[dict[str, Any]], stage: StageDir, config: ClassifierTrainConfig,
                     num_classes: int, supervision: str) -> dict[str, Any]:
    """Train on the manifest rows, export ``model.pt``; resumes a half-done run from its checkpoint."""
    workers = config.workers.num_workers
    batch_size, steps = steps_per_epoch(len(records), config.batch_size, workers)
    log("train_cls", f"{len(records)} images, {workers} workers × batch {batch_size}, {steps} steps/epoch, "
                     f"{config.epochs} epochs → {stage.uri}")
    dataset = ray.data.from_items(records).map(
        classifier_sample, fn_kwargs={"augment": config.augment, "num_foreground": num_classes - 1,
                                      "supervision": supervision})
    loop = {"config": config, "build_model": partial(CamClassifier, config, num_classes - 1),
            "loss": CLASSIFIER_LOSSES[config.loss.name](config.loss), "target": "target",
            "batch_size": batch_size, "steps_per_epoch": steps}
    return {**export_model(fit(loop, config.workers, {"train": dataset}, stage), stage), "images": len(records)}
