"""Stage ``ingest``: the manifest, one row per usable image, built in parallel with Ray Data.

The reader lists the split on the driver (cheap: ids, or the COCO annotations once), Ray tasks parse and
validate every image (decode it, check mask sizes and label ranges), and the driver writes two parquet
tables: ``manifest.parquet`` (the records every later stage reads) and ``failures.parquet`` (file + reason for
each bad item, which is skipped, never fatal).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from typing import Any

import pyarrow as pa
import ray

from wsss_ray.core import storage
from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.items import BadItemError, ItemLoop
from wsss_ray.core.progress import log
from wsss_ray.core.records import ManifestRecord
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import class_names
from wsss_ray.data.coco import CocoReader
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.data.voc import VocReader

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("split", pa.string()), ("image_uri", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("tags", pa.list_(pa.int32())),
    ("boxes", pa.list_(pa.list_(pa.int32()))), ("mask_uri", pa.string()), ("scribble_uri", pa.string()),
])
SHOWN_FAILURES = 10  # the console lists this many skipped files; failures.parquet has them all
FAILURES_SCHEMA = pa.schema([("image_id", pa.string()), ("split", pa.string()), ("file", pa.string()),
                             ("reason", pa.string())])


def make_reader(config: DatasetConfig) -> VocReader | CocoReader:
    if config.format == "coco":
        return CocoReader(config.root)
    # A split that is both train and val keeps the train rule: its pseudo-masks are scored on the same records.
    official = config.val_ground_truth == "official" and config.val_split != config.train_split
    return VocReader(config.root, official_splits=[config.val_split] if official else [])


def ground_truth_sources(records: list[ManifestRecord], splits: list[str], fmt: str) -> dict[str, str | None]:
    """Per split, what its records' ``mask_uri`` point at (metrics.json's ``ground_truth``), read from the
    records themselves so that it is true of the manifest the scores used, whatever the config says now.

    VOC: the folder (``SegmentationClass`` / ``SegmentationClassAug``; a mix is listed with counts); COCO: the
    instance annotations the masks were rendered from; None when no record of the split has ground truth.
    """
    out: dict[str, str | None] = {}
    for split in dict.fromkeys(splits):
        uris = [r["mask_uri"] for r in records if r["split"] == split and r["mask_uri"]]
        if not uris:
            out[split] = None
        elif fmt == "coco":
            out[split] = f"annotations/instances_{split}.json (rendered at ingest)"
        else:
            folders = Counter(uri.rstrip("/").split("/")[-2] for uri in uris)
            out[split] = " + ".join(f"{name} ({n})" for name, n in sorted(folders.items())) \
                if len(folders) > 1 else next(iter(folders))
    return out


def _parse(item: dict[str, Any], reader: VocReader | CocoReader, masks_out_uri: str) -> dict[str, Any]:
    """Ray Data map: one record, or the reason it is unusable (file and reason). JSON keeps the row schema uniform."""
    try:
        return {"record": json.dumps(reader.parse(item, masks_out_uri)), "failure": None}
    except BadItemError as error:
        failure = {"image_id": item["image_id"], "split": item["split"], "file": error.file, "reason": error.reason}
    except Exception as error:  # noqa: BLE001 - anything unreadable is a bad item, reported with its cause
        failure = {"image_id": item["image_id"], "split": item["split"], "file": item.get("image_id", ""),
                   "reason": f"{type(error).__name__}: {error}"}
    return {"record": None, "failure": json.dumps(failure)}


def build_manifest(config: DatasetConfig, stage: StageDir) -> dict[str, Any]:
    """Parse the train and val splits into ``<stage>/manifest.parquet``; returns the summary."""
    reader = make_reader(config)
    items: list[dict[str, Any]] = []
    for split in dict.fromkeys([config.train_split, config.val_split]):
        split_items = reader.items(split)
        items += split_items[: config.max_images] if config.max_images else split_items
    log("ingest", f"{len(items)} images from {config.root} ({config.format}) → {stage.uri}")
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 16, 64)))
    ds = ds.map(_parse, fn_kwargs={"reader": reader, "masks_out_uri": stage.path("masks")})
    records, failures = [], []
    for row in ItemLoop("ingest", len(items)).rows(ds.iter_rows(), error_key="failure"):
        if row["record"] is not None:
            records.append(json.loads(row["record"]))
        else:
            failures.append(json.loads(row["failure"]))
    records.sort(key=lambda r: (r["split"], r["image_id"]))
    storage.write_parquet(stage.path("failures.parquet"), pa.Table.from_pylist(failures, schema=FAILURES_SCHEMA))
    storage.write_parquet(stage.path("manifest.parquet"), pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA))
    for line in skipped_lines(failures, stage.path("failures.parquet")):
        log("ingest", line)
    counts = {split: sum(r["split"] == split for r in records) for split in dict.fromkeys(i["split"] for i in items)}
    return {"images": len(items), "records": len(records), "per_split": counts, "failed": len(failures),
            "failures_uri": stage.path("failures.parquet"), "manifest_uri": stage.path("manifest.parquet"),
            "classes": class_names(config.format)}


def skipped_lines(failures: list[dict[str, Any]], failures_uri: str) -> list[str]:
    """The console's account of the skipped files: the first few, and how many more the table holds."""
    lines = [f"skipped {f['file']}: {f['reason']}" for f in failures[:SHOWN_FAILURES]]
    if len(failures) > SHOWN_FAILURES:
        lines.append(f"... and {len(failures) - SHOWN_FAILURES} more skipped: all {len(failures)} in {failures_uri}")
    return lines


def load_manifest(stage: StageDir, split: str | None = None) -> list[ManifestRecord]:
    rows = storage.read_parquet(stage.path("manifest.parquet")).to_pylist()
    return [r for r in rows if split is None or r["split"] == split]


def load_failures(stage: StageDir) -> list[dict[str, Any]]:
    return storage.read_parquet(stage.path("failures.parquet")).to_pylist()


def dataset_present(config: DatasetConfig) -> bool:
    if config.format == "voc":
        return storage.exists(storage.join(config.root, "ImageSets", "Segmentation", f"{config.train_split}.txt"))
    return storage.exists(storage.join(config.root, "annotations", f"instances_{config.train_split}.json"))


def ensure_dataset(config: DatasetConfig) -> None:
    """Generate the toy dataset at ``root`` when the config asks for it and nothing is there yet."""
    if config.generate is None or dataset_present(config):
        return
    toy = config.generate
    log("dataset", f"generating the toy {config.format.upper()} dataset at {config.root}")
    kwargs = {"fmt": config.format, "num_train": toy.num_train, "num_val": toy.num_val,
              "image_size": toy.image_size, "num_classes": toy.num_classes, "max_objects": toy.max_objects,
              "seed": toy.seed}
    local = storage.local_path_or_none(config.root)
    if local is not None:
        make_toy_dataset(local, **kwargs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_toy_dataset(tmp, **kwargs)
        storage.upload_dir(tmp, config.root)
