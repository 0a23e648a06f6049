"""PASCAL VOC 2012 reader (also the SBD-augmented ``SegmentationClassAug`` masks and scribble PNGs)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Collection
from typing import Any

import numpy as np

from wsss_ray.core import storage
from wsss_ray.core.items import BadItemError
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.image_io import decode_image, decode_label_png

_LABEL_OF = {name: label for label, name in enumerate(VOC_CLASSES) if label > 0}


def check_label_map(labels: np.ndarray, uri: str, num_classes: int, image_hw: tuple[int, int], what: str) -> None:
    """Raise BadItemError unless ``labels`` has the image's size and values in 0..num_classes-1 or 255."""
    if labels.shape != image_hw:
        raise BadItemError(uri, f"{what} size {labels.shape[1]}x{labels.shape[0]} != image size "
                                f"{image_hw[1]}x{image_hw[0]}")
    values = np.unique(labels)
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_LABEL]
    if bad:
        raise BadItemError(uri, f"{what} label values out of range 0..{num_classes - 1} or {IGNORE_LABEL}: {bad}")


GROUND_TRUTH_FOLDERS = ("SegmentationClassAug", "SegmentationClass")


class VocReader:
    """Lists a VOC split on the driver (``items``) and parses/validates one image in a worker (``parse``).

    A record's ``mask_uri`` is the first of ``SegmentationClassAug``, ``SegmentationClass`` that holds the image,
    except for the ``official_splits`` (the val split under ``dataset.val_ground_truth: official``), which look in
    ``SegmentationClass`` (VOC's own masks, with the void band) first.
    """

    def __init__(self, root: str, official_splits: Collection[str] = ()) -> None:
        self.root = root.rstrip("/")
        self.official_splits = frozenset(official_splits)

    def _uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def split_uri(self, split: str) -> str:
        """The split's id list: ``ImageSets/Segmentation/{split}.txt``, else ``ImageSets/Main/{split}.txt``."""
        segmentation = self._uri("ImageSets", "Segmentation", f"{split}.txt")
        if storage.exists(segmentation):
            return segmentation
        main = self._uri("ImageSets", "Main", f"{split}.txt")
        if storage.exists(main):
            return main
        raise FileNotFoundError(f"VOC split list for {split!r} not found: {segmentation} (nor {main})")

    def items(self, split: str) -> list[dict[str, Any]]:
        """One ``{"image_id", "split"}`` dict per id in the split list, in file order, without duplicates."""
        ids: dict[str, None] = {}
        for line in storage.read_text(self.split_uri(split)).splitlines():
            fields = line.split()
            if fields:
                ids[fields[0]] = None  # Main/ lists may carry a second column (per-class lists): ignore it
        return [{"image_id": image_id, "split": split} for image_id in ids]

    def parse(self, item: dict[str, Any], masks_out_uri: str | None = None) -> dict[str, Any]:
        """Manifest record of one image; raises BadItemError naming the bad file. ``masks_out_uri`` is unused:
        VOC masks already exist as PNGs."""
        image_id, split = str(item["image_id"]), str(item["split"])
        image_uri = self._uri("JPEGImages", f"{image_id}.jpg")
        if not storage.exists(image_uri):
            raise BadItemError(image_uri, "image file is missing")
        height, width = decode_image(storage.read_bytes(image_uri), image_uri).shape[:2]

        mask_uri: str | None = None
        folders = GROUND_TRUTH_FOLDERS[::-1] if split in self.official_splits else GROUND_TRUTH_FOLDERS
        for folder in folders:
            candidate = self._uri(folder, f"{image_id}.png")
            if storage.exists(candidate):
                mask_uri = candidate
                break
        xml_uri = self._uri("Annotations", f"{image_id}.xml")
        has_xml = storage.exists(xml_uri)
        if not has_xml and mask_uri is None:
            raise BadItemError(xml_uri, "annotation is missing (no XML and no segmentation mask)")

        mask_tags: list[int] = []
        if mask_uri is not None:
            mask = decode_label_png(storage.read_bytes(mask_uri), mask_uri)
            check_label_map(mask, mask_uri, len(VOC_CLASSES), (height, width), "mask")
            mask_tags = [int(v) for v in np.unique(mask) if 0 < v < len(VOC_CLASSES)]

        if has_xml:
            tags, boxes = self._parse_xml(xml_uri, height, width)
        else:
            tags, boxes = mask_tags, []

        scribble_uri: str | None = self._uri("Scribbles", f"{image_id}.png")
        if storage.exists(scribble_uri):
            scribble = decode_label_png(storage.read_bytes(scribble_uri), scribble_uri)
            check_label_map(scribble, scribble_uri, len(VOC_CLASSES), (height, width), "scribble")
        else:
            scribble_uri = None

        return {"image_id": image_id, "split": split, "image_uri": image_uri, "height": int(height),
                "width": int(width), "tags": sorted(set(tags)), "boxes": boxes, "mask_uri": mask_uri,
                "scribble_uri": scribble_uri}

    @staticmethod
    def _parse_xml(xml_uri: str, height: int, width: int) -> tuple[list[int], list[list[int]]]:
        """Tags (difficult objects included) and 0-based, end-exclusive boxes of a VOC annotation."""
        try:
            root = ET.fromstring(storage.read_bytes(xml_uri))
        except ET.ParseError as error:
            raise BadItemError(xml_uri, f"cannot parse XML: {error}") from error
        tags: list[int] = []
        boxes: list[list[int]] = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in _LABEL_OF:
                raise BadItemError(xml_uri, f"unknown class name {name!r}")
            label = _LABEL_OF[name]
            tags.append(label)
            bndbox = obj.find("bndbox")
            if bndbox is None:
                continue
            try:
                # Some VOC files write coordinates as floats ("273.0"): round, then 1-based inclusive -> 0-based
                # exclusive means subtracting 1 from the start only.
                xmin, ymin, xmax, ymax = (round(float(bndbox.findtext(key) or "")) for key in
                                          ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as error:
                raise BadItemError(xml_uri, f"bad bndbox of a {name!r} object: {error}") from error
            x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise BadItemError(xml_uri, f"box {[xmin, ymin, xmax, ymax]} of a {name!r} object lies outside "
                                            f"the {width}x{height} image")
            boxes.append([label, x1, y1, x2, y2])
        return tags, boxes
