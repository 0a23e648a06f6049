"""Stage ``train_cls``: the CAM classifier, trained from weak labels with DDP on Ray Train."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from wsss_ray.core.config_base import AugmentConfig
from wsss_ray.core.progress import log
from wsss_ray.core.records import ManifestRecord
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import read_image
from wsss_ray.data.transforms import apply_geometry, random_geometry
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.methods.registry import CLASSIFIER_HEADS, build_classifier, build_classifier_objective
from wsss_ray.pipeline_config import ClassifierTrainConfig
from wsss_ray.training.checkpoint import export_model
from wsss_ray.training.ingest import RowSource, augment_rng, steps_per_epoch
from wsss_ray.training.loop import TrainSpec, fit


def classifier_sample(row: dict[str, Any], augment: AugmentConfig, num_foreground: int, supervision: str,
                      head_fields: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Ray Data map (per row of a block): one augmented crop, its multi-hot target over the foreground classes, and
    the head's own fields (``sample_fields`` of its class: BAP's boxes moved into the crop's frame)."""
    image = read_image(row["image_uri"])
    geometry = random_geometry(image.shape[:2], augment.crop_size, (augment.scale_min, augment.scale_max),
                               augment.flip, augment_rng(row))
    target = np.zeros(num_foreground, np.float32)
    target[[t - 1 for t in weak_tags(row, supervision)]] = 1.0
    sample = {"image": apply_geometry(image, geometry, 0, Image.BILINEAR), "target": target}
    sample.update(head_fields(row, geometry, image.shape[:2]))
    return sample


def train_classifier(records: list[ManifestRecord], stage: StageDir, config: ClassifierTrainConfig,
                     num_classes: int, supervision: str) -> dict[str, Any]:
    """Train on the manifest rows, export ``model.pt``; resumes a half-done run from its checkpoint.

    (``PipelineConfig`` has checked that the head and loss fit the dataset's supervision: BAP needs boxes.)
    """
    workers = config.workers.num_workers
    batch_size, steps = steps_per_epoch(len(records), config.batch_size, workers, "train_cls")
    log("train_cls", f"{len(records)} images, {config.head.name} head + {config.loss.name} loss, batch "
                     f"{config.batch_size} = {workers} workers × {batch_size}, {steps} steps/epoch, "
                     f"{config.epochs} epochs → {stage.uri}")
    source = RowSource(records, classifier_sample,
                       {"augment": config.augment, "num_foreground": num_classes - 1, "supervision": supervision,
                        "head_fields": CLASSIFIER_HEADS.implementation(config.head.name).sample_fields})
    spec = TrainSpec(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                     optimizer=config.optimizer, head_lr_multiplier=config.head_lr_multiplier,
                     build_model=partial(build_classifier, config, num_classes - 1),
                     build_objective=partial(build_classifier_objective, config), train=source, where="train_cls",
                     sync_bn=config.sync_bn, speed=config.speed)
    return {**export_model(fit(spec, config.workers, stage), stage), "images": len(records)}
