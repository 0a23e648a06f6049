"""Stage ``train_seg``: DeepLab trained on the pseudo-masks with DDP on Ray Train and Ray Data ingest.

Each training row names the image and the per-pixel maps its objective reads (``<map>_uri``: the pseudo-mask
``label``, BANA's ``retrieved``, CDSP's ``scribble`` and distance maps, MSPN's vote). The Ray Data map crops them
all with one random :class:`~wsss_ray.data.transforms.CropGeometry`, which travels with the batch so OuT's
cumulative corrector can carry corrected masks at full resolution. What an objective needs beyond its maps
(per-image fields, the width of the features it projects) it declares on its component and the stage reads it
through ``methods/registry.py``; the training hooks (OuT's corrector, robust early-learning) come from their
config sections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from PIL import Image
from torch import nn

from wsss_ray.core.config_base import AugmentConfig
from wsss_ray.core.items import BadItemError
from wsss_ray.core.progress import log
from wsss_ray.core.records import ManifestRecord, TrainingRecord
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.data.transforms import apply_geometry, random_geometry
from wsss_ray.methods.registry import (
    build_segmentation_objective,
    build_training_hooks,
    map_padding,
    segmentation_maps,
    segmentation_row_fields,
)
from wsss_ray.models.card import ensure_model_card
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.training.checkpoint import export_model
from wsss_ray.training.hooks import TrainHook
from wsss_ray.training.ingest import RowSource, augment_rng, steps_per_epoch
from wsss_ray.training.loop import TrainSpec, fit


def segmentation_sample(row: dict[str, Any], augment: AugmentConfig, maps: tuple[str, ...], num_classes: int,
                        padding: dict[str, int],
                        row_fields: Callable[[Mapping[str, Any], int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ray Data map (per row of a block): the image and its ``maps``, scaled, cropped and flipped together (one
    draw per row and epoch, from the row's ``augment_seed``). ``padding`` is what a crop's padding holds in each
    map (:func:`~wsss_ray.methods.registry.map_padding`: label maps ignore it, weights and counts are zero
    there); ``row_fields`` adds the objective's per-image fields
    (:func:`~wsss_ray.methods.registry.segmentation_row_fields`)."""
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
        sample[name] = apply_geometry(array, geometry, padding[name])
    if row_fields is not None:
        sample.update(row_fields(row, num_classes))
    return sample


def val_sample(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: a val image and its ground truth, unaugmented."""
    return {"image": read_image(row["image_uri"]), "label": read_label(row["mask_uri"])}


def train_segmentation(records: list[TrainingRecord], stage: StageDir, config: SegTrainConfig,
                       num_classes: int, val_records: list[ManifestRecord] | None = None,
                       callbacks: list[Any] | None = None, class_names: list[str] | None = None, *,
                       extra_maps: Mapping[str, int] | None = None,
                       extra_hooks: Callable[[nn.Module, str], list[TrainHook]] | None = None) -> dict[str, Any]:
    """Train on rows carrying ``image_uri`` and the ``<map>_uri`` of every map the loss reads; export ``model.pt``.

    With ``val_records`` (manifest rows with ground truth) and ``config.val_every`` > 0, val mIoU is measured
    during training and reported with the epoch's metrics (curves in the report; what Tune's schedulers read).
    With ``class_names``, ``model.json`` (the card ``wsss-ray predict``/``export`` read) is written beside
    ``model.pt`` as part of the stage, i.e. before the caller's ``_SUCCESS.json``. ``extra_maps`` (name →
    crop padding) are more maps carried through the crops and ``extra_hooks(model, stage_uri)`` more hooks after
    the config's: what a benchmark's probes read.
    """
    maps = (*segmentation_maps(config.loss), *(extra_maps or {}))
    # (``PipelineConfig`` has checked that a corrector's loss reads the pseudo-mask; the records are data.)
    have = set(records[0]) if records else {f"{m}_uri" for m in maps}
    if missing := sorted({f"{m}_uri" for m in segmentation_maps(config.loss)} - have):
        raise ValueError(f"train_seg.loss {config.loss.name!r} needs {missing} in every record; the pseudo-label "
                         "generator that produces them is not the one this pipeline ran")
    if missing := sorted({f"{m}_uri" for m in extra_maps or {}} - have):
        raise ValueError(f"train_segmentation: extra_maps need {missing} in every record")
    workers = config.workers.num_workers
    batch_size, steps = steps_per_epoch(len(records), config.batch_size, workers, "train_seg")
    methods = " + ".join(filter(None, [config.loss.name, config.corrector and "OuT", config.early_learning and "RE"]))
    log("train_seg", f"{len(records)} images, {config.model.name} with {methods}, batch {config.batch_size} = "
                     f"{workers} workers × {batch_size}, {steps} steps/epoch, {config.epochs} epochs → {stage.uri}")
    train = RowSource(records, segmentation_sample,
                      {"augment": config.augment, "maps": maps, "num_classes": num_classes,
                       "padding": {**map_padding(), **(extra_maps or {})},
                       "row_fields": segmentation_row_fields(config.loss)})
    val_rows = [r for r in val_records or [] if r["mask_uri"]]
    val = RowSource(val_rows, val_sample) if val_rows and config.val_every else None
    spec = TrainSpec(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                     optimizer=config.optimizer, head_lr_multiplier=config.head_lr_multiplier,
                     build_model=partial(build_segmentation_model, config.model, num_classes),
                     build_objective=partial(_objective, config, num_classes), train=train, where="train_seg",
                     val=val, build_hooks=partial(_hooks, config, extra_hooks), sync_bn=config.model.sync_bn,
                     speed=config.speed, num_classes=num_classes, val_every=config.val_every if val else 0)
    result = fit(spec, config.workers, stage, callbacks)
    summary = {**export_model(result, stage), "images": len(records)}
    if class_names is not None:
        summary["model_card_uri"] = ensure_model_card(stage.uri, config.model, class_names, overwrite=True)
    return summary


def _objective(config: SegTrainConfig, num_classes: int) -> nn.Module:
    # The objective is built for the model (its feature width, read by the objective's ``feature_channels``).
    return build_segmentation_objective(config, num_classes, partial(build_segmentation_model, config.model,
                                                                     num_classes))


def _hooks(config: SegTrainConfig, extra: Callable[[nn.Module, str], list[TrainHook]] | None, model: nn.Module,
           stage_uri: str) -> list[TrainHook]:
    """The training hooks of ``config`` (in the order the loop calls them), then the caller's ``extra``."""
    return build_training_hooks(config, model, stage_uri) + (extra(model, stage_uri) if extra else [])
