"""Stage ``train_cls``: the CAM classifier, trained from weak labels with DDP on Ray Train."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from wsss_ray.config import AugmentConfig, ClassifierTrainConfig
from wsss_ray.data.image_io import read_image
from wsss_ray.data.transforms import apply_geometry, random_geometry, transform_boxes
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.models.classifier import CamClassifier
from wsss_ray.progress import log
from wsss_ray.pseudo_labels.boxes import boxes_array
from wsss_ray.stage_dir import StageDir
from wsss_ray.training.common import augment_rng, epoch_seeded_dataset, export_model, fit, steps_per_epoch
from wsss_ray.training.objectives import build_classifier_objective

# Boxes per training crop for BAP (padded to a fixed shape); VOC images have at most ~40, crops far fewer.
MAX_BOXES = 32


def classifier_sample(row: dict[str, Any], augment: AugmentConfig, num_foreground: int, supervision: str,
                      with_boxes: bool) -> dict[str, Any]:
    """Ray Data map: one augmented crop, its multi-hot target over the foreground classes, and (BAP) its boxes
    moved into the crop's frame."""
    image = read_image(row["image_uri"])
    geometry = random_geometry(image.shape[:2], augment.crop_size, (augment.scale_min, augment.scale_max),
                               augment.flip, augment_rng(row))
    target = np.zeros(num_foreground, np.float32)
    target[[t - 1 for t in weak_tags(row, supervision)]] = 1.0
    sample = {"image": apply_geometry(image, geometry, 0, Image.BILINEAR), "target": target}
    if with_boxes:
        sample["boxes"] = transform_boxes(boxes_array(row.get("boxes")), geometry, image.shape[:2], MAX_BOXES)
    return sample


def train_classifier(records: list[dict[str, Any]], stage: StageDir, config: ClassifierTrainConfig,
                     num_classes: int, supervision: str) -> dict[str, Any]:
    """Train on the manifest rows, export ``model.pt``; resumes a half-done run from its checkpoint."""
    if config.head.name == "bap" and supervision != "boxes":
        raise ValueError(f"train_cls.head: 'bap' pools features inside boxes; dataset.supervision is {supervision!r}")
    workers = config.workers.num_workers
    batch_size, steps = steps_per_epoch(len(records), config.batch_size, workers)
    log("train_cls", f"{len(records)} images, {config.head.name} head + {config.loss.name} loss, {workers} workers × "
                     f"batch {batch_size}, {steps} steps/epoch, {config.epochs} epochs → {stage.uri}")
    dataset = epoch_seeded_dataset(
        records, config.seed, classifier_sample,
        {"augment": config.augment, "num_foreground": num_classes - 1, "supervision": supervision,
         "with_boxes": config.head.name == "bap"})
    loop = {"config": config, "build_model": partial(CamClassifier, config, num_classes - 1),
            "build_objective": partial(build_classifier_objective, config), "num_rows": len(records)}
    return {**export_model(fit(loop, config.workers, {"train": dataset}, stage), stage), "images": len(records)}
