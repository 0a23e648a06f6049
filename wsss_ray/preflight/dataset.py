"""Pre-flight check of ``dataset``: the root, the split lists, and the folders the supervision reads."""

from __future__ import annotations

from wsss_ray.core import storage
from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.pipeline_config import PipelineConfig
from wsss_ray.preflight import probe
from wsss_ray.preflight.problem import REPRODUCE_DOC, PreflightOptions, Problem

SBD_SPLIT = "train_aug"
AUG_FOLDER = "SegmentationClassAug"
SBD_FIX = (f"{SBD_SPLIT} is SBD's augmented split (10,582 images), not in the VOC 2012 tarball: put train_aug.txt "
           f"in ImageSets/Segmentation/ and SBD's masks in {AUG_FOLDER}/; see {REPRODUCE_DOC}")


def check_dataset(config: PipelineConfig, options: PreflightOptions) -> list[Problem]:
    """``dataset.root`` and what the config reads below it (VOC or COCO layout)."""
    ds = config.dataset
    if options.skip_remote(ds.root, "dataset.root"):
        return []
    try:
        if ds.generate is not None and not probe.exists(ds.root):
            return []  # the toy dataset is generated there at the start of the run
        if not probe.exists(ds.root):
            layout = "VOC2012 folder (the one holding JPEGImages/ and ImageSets/)" if ds.format == "voc" else \
                "COCO folder (the one holding annotations/ and the image folders)"
            return [Problem("dataset.root", ds.root, "does not exist",
                            f"point dataset.root at the {layout}; see {REPRODUCE_DOC}")]
        return _voc_problems(ds) if ds.format == "voc" else _coco_problems(ds)
    except probe.Unreachable as error:
        return [Problem("dataset.root", ds.root, error.what, error.fix)]


def _missing_folder(ds: DatasetConfig, field: str, folder: str, why: str, fix: str) -> list[Problem]:
    uri = storage.join(ds.root, folder)
    return [] if probe.is_dir(uri) else [Problem(field, uri + "/", f"missing: {why}", fix)]


def _voc_problems(ds: DatasetConfig) -> list[Problem]:
    problems = _missing_folder(ds, "dataset.root", "JPEGImages", "no VOC images there",
                               "dataset.root must be the VOC2012 folder itself (.../VOCdevkit/VOC2012); "
                               f"see {REPRODUCE_DOC}")
    if problems:
        return problems  # not a VOC folder at all: the rest would only repeat it
    for field in ("train_split", "val_split"):
        split = getattr(ds, field)
        if field == "val_split" and split == ds.train_split:
            continue
        lists = [storage.join(ds.root, "ImageSets", kind, f"{split}.txt") for kind in ("Segmentation", "Main")]
        if not any(probe.exists(uri) for uri in lists):
            fix = SBD_FIX if split == SBD_SPLIT else \
                f"use a split listed in ImageSets/Segmentation/ (train, val, trainval), or add {split}.txt there"
            problems.append(Problem(f"dataset.{field}", lists[0], f"split list {split!r} not found "
                                                                   "(nor in ImageSets/Main/)", fix))
    if ds.train_split == SBD_SPLIT or ds.val_ground_truth == "aug":
        field = "dataset.train_split" if ds.train_split == SBD_SPLIT else "dataset.val_ground_truth"
        problems += _missing_folder(ds, field, AUG_FOLDER, "SBD's augmented masks, which score the train_aug "
                                    "pseudo-masks" if field.endswith("split") else "the masks val is scored "
                                    "against with val_ground_truth: aug", f"unpack SBD's augmented masks as {AUG_FOLDER}/ "
                                    f"into the VOC2012 folder; see {REPRODUCE_DOC}")
    if ds.supervision == "boxes":
        problems += _missing_folder(ds, "dataset.supervision", "Annotations", "the XML files the boxes come from",
                                    "add VOC's Annotations/ folder (in the VOC 2012 tarball)")
    if ds.supervision == "scribbles":
        problems += _missing_folder(ds, "dataset.supervision", "Scribbles", "one scribble PNG per image",
                                    f"add the scribble PNGs (ScribbleSup, rendered) as Scribbles/<id>.png; see "
                                    f"{REPRODUCE_DOC}")
    return problems


def _coco_problems(ds: DatasetConfig) -> list[Problem]:
    problems: list[Problem] = []
    for field in ("train_split", "val_split"):
        split = getattr(ds, field)
        if field == "val_split" and split == ds.train_split:
            continue
        annotations = storage.join(ds.root, "annotations", f"instances_{split}.json")
        if not probe.exists(annotations):
            problems.append(Problem(f"dataset.{field}", annotations, f"annotations of split {split!r} not found",
                                    f"unpack COCO's annotations_trainval archive into annotations/; see "
                                    f"{REPRODUCE_DOC}"))
        problems += _missing_folder(ds, f"dataset.{field}", split, f"the {split} images",
                                    f"unpack COCO's {split}.zip into {split}/")
    if ds.supervision == "scribbles":
        problems += _missing_folder(ds, "dataset.supervision", f"scribbles/{ds.train_split}",
                                    "one scribble PNG per image", f"add the scribble PNGs as "
                                    f"scribbles/{ds.train_split}/<id>.png")
    return problems
