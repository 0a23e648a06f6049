"""Stage ``train_seg``: DeepLab trained on the pseudo-masks with DDP on Ray Train and Ray Data ingest.

Each training row names the image and the per-pixel maps its objective reads (``<map>_uri``: the pseudo-mask
``label``, BANA's ``retrieved``, CDSP's ``scribble`` and distance maps, MSPN's vote). The Ray Data map crops them
all with one random :class:`~wsss_ray.data.transforms.CropGeometry`, which travels with the batch so OuT's
cumulative corrector can carry corrected masks at full resolution.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import ray
from PIL import Image

from wsss_ray.config import AugmentConfig, SegTrainConfig
from wsss_ray.data.classes import IGNORE_LABEL
from wsss_ray.data.image_io import BadItemError, read_image, read_label
from wsss_ray.data.transforms import apply_geometry, random_geometry
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.progress import log
from wsss_ray.pseudo_labels.multi_seed import MAX_PROPOSAL_LABELS
from wsss_ray.stage_dir import StageDir
from wsss_ray.training.common import augment_rng, epoch_seeded_dataset, export_model, fit, steps_per_epoch
from wsss_ray.training.objectives import build_segmentation_objective, segmentation_maps

# What a crop's padding holds in each map: label maps ignore it, weights and counts are zero there.
MAP_PADDING = {"label": IGNORE_LABEL, "retrieved": IGNORE_LABEL, "scribble": IGNORE_LABEL, "majority": IGNORE_LABEL,
               "agreement": 0, "proposed": 0, "dist_scribble": 0, "dist_boundary": 0}


def segmentation_sample(row: dict[str, Any], augment: AugmentConfig, maps: tuple[str, ...],
                        num_classes: int) -> dict[str, Any]:
    """Ray Data map: the image and its ``maps``, scaled, cropped and flipped together (one draw per row and
    epoch, from the row's ``augment_seed``)."""
    image = read_image(row["image_uri"])
    geometry = random_geometry(image.shape[:2], augment.crop_size, (augment.scale_min, augment.scale_max),
                               augment.flip, augment_rng(row))
    sample: dict[str, Any] = {"image": apply_geometry(image, geometry, 0, Image.BILINEAR),
                              "geometry": geometry.as_array(), "image_id": str(row["image_id"]),
                              "label_uri": row["label_uri"]}
    for name in maps:
        uri = row[f"{name}_uri"]
        array = read_label(uri)
        if array.shape != image.shape[:2]:
            raise BadItemError(uri, f"{name} map {array.shape} differs from image {image.shape[:2]}")
        sample[name] = apply_geometry(array, geometry, MAP_PADDING[name])
    if "label_list" in row:
        # The image's label set (background first), for MSPN: bit k of ``proposed`` stands for label_list[k].
        labels = [int(v) for v in row["label_list"]]
        padded = np.full(MAX_PROPOSAL_LABELS, -1, np.int64)
        padded[:min(len(labels), MAX_PROPOSAL_LABELS)] = labels[:MAX_PROPOSAL_LABELS]
        present = np.zeros(num_classes, np.bool_)
        present[labels] = True
        sample.update(label_list=padded, present=present)
    return sample


def val_sample(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: a val image and its ground truth, unaugmented."""
    return {"image": read_image(row["image_uri"]), "label": read_label(row["mask_uri"])}


def train_segmentation(records: list[dict[str, Any]], stage: StageDir, config: SegTrainConfig,
                       num_classes: int, val_records: list[dict[str, Any]] | None = None,
                       callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train on rows carrying ``image_uri`` and the ``<map>_uri`` of every map the loss reads; export ``model.pt``.

    With ``val_records`` (manifest rows with ground truth) and ``config.val_every`` > 0, val mIoU is measured
    during training and reported with the epoch's metrics (curves in the report; what Tune's schedulers read).
    """
    maps = segmentation_maps(config.loss)
    if config.corrector is not None and "label" not in maps:
        raise ValueError(f"train_seg.corrector: OuT corrects the pseudo-mask, which loss {config.loss.name!r} "
                         "does not read")
    missing = sorted({f"{m}_uri" for m in maps} - set(records[0])) if records else []
    if missing:
        raise ValueError(f"train_seg.loss {config.loss.name!r} needs {missing} in every record; the pseudo-label "
                         "generator that produces them is not the one this pipeline ran")
    workers = config.workers.num_workers
    batch_size, steps = steps_per_epoch(len(records), config.batch_size, workers)
    methods = " + ".join(filter(None, [config.loss.name, config.corrector and "OuT", config.early_learning and "RE"]))
    log("train_seg", f"{len(records)} images, {config.model.name} with {methods}, {workers} workers × batch "
                     f"{batch_size}, {steps} steps/epoch, {config.epochs} epochs → {stage.uri}")
    datasets = {"train": epoch_seeded_dataset(
        records, config.seed, segmentation_sample,
        {"augment": config.augment, "maps": maps, "num_classes": num_classes})}
    val = [r for r in val_records or [] if r["mask_uri"]]
    if val and config.val_every:
        datasets["val"] = ray.data.from_items(val).map(val_sample)
    build_model = partial(build_segmentation_model, config.model, num_classes)
    loop = {"config": config, "build_model": build_model,
            "build_objective": partial(_objective, config, num_classes),
            "corrector": config.corrector, "early_learning": config.early_learning,
            "num_rows": len(records), "num_classes": num_classes,
            "val_every": config.val_every if "val" in datasets else 0}
    result = fit(loop, config.workers, datasets, stage, callbacks)
    return {**export_model(result, stage), "images": len(records)}


def _objective(config: SegTrainConfig, num_classes: int) -> Any:
    # φ's width is the model's, so build a throwaway model to read it only when the objective needs it (LoRM).
    width = 0
    if config.loss.name == "cdsp" and config.loss.lorm:
        width = build_segmentation_model(config.model, num_classes).classifier_weight().shape[1]
    return build_segmentation_objective(config.loss, num_classes, width)
