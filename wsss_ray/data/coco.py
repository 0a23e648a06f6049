"""COCO instances reader: semantic masks are rendered from the instance annotations in the workers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import posixpath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from wsss_ray.core import storage
from wsss_ray.core.items import BadItemError
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.data.classes import COCO_CATEGORY_TO_LABEL, COCO_CLASSES
from wsss_ray.data.image_io import decode_image, decode_label_png, encode_label_png
from wsss_ray.data.voc import check_label_map


def load_coco(ann_uri: str) -> COCO:
    """A pycocotools index of an instances JSON read through storage (so S3 works too)."""
    coco = COCO()
    coco.dataset = json.loads(storage.read_bytes(ann_uri))
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Boolean H×W mask of a polygon list, an uncompressed RLE or a compressed RLE."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)) if segmentation else None
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    if rle is None:
        return np.zeros((height, width), bool)
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation size {mask.shape[1]}x{mask.shape[0]} != {width}x{height}")
    return mask.astype(bool)


class CocoReader:
    """Reads ``annotations/instances_{split}.json`` once on the driver; workers render and validate images.

    The reader itself holds only paths, so it pickles cheaply into Ray tasks.
    """

    def __init__(self, root: str, ann_pattern: str = "annotations/instances_{split}.json",
                 image_dir_pattern: str = "{split}") -> None:
        self.root = root.rstrip("/")
        self.ann_pattern = ann_pattern
        self.image_dir_pattern = image_dir_pattern

    def ann_uri(self, split: str) -> str:
        return storage.join(self.root, *self.ann_pattern.format(split=split).split("/"))

    def image_uri(self, split: str, file_name: str) -> str:
        return storage.join(self.root, *self.image_dir_pattern.format(split=split).split("/"), file_name)

    def items(self, split: str) -> list[dict[str, Any]]:
        """One dict per image, sorted by COCO id, carrying its annotations.

        ``anns`` is a JSON string (a list of {bbox, category_id, segmentation, iscrowd, area}) because polygons,
        RLEs and empty lists would otherwise give each Ray block a different arrow type.
        """
        ann_uri = self.ann_uri(split)
        if not storage.exists(ann_uri):
            raise FileNotFoundError(f"COCO annotations for split {split!r} not found: {ann_uri}")
        coco = load_coco(ann_uri)
        items: list[dict[str, Any]] = []
        for coco_id in sorted(coco.imgs):
            info = coco.imgs[coco_id]
            anns = [{"bbox": [float(v) for v in ann.get("bbox", [])], "category_id": int(ann["category_id"]),
                     "segmentation": ann.get("segmentation", []), "iscrowd": int(ann.get("iscrowd", 0)),
                     "area": float(ann.get("area", 0.0))} for ann in coco.imgToAnns.get(coco_id, [])]
            file_name = str(info["file_name"])
            items.append({"image_id": posixpath.splitext(posixpath.basename(file_name))[0], "split": split,
                          "coco_id": int(coco_id), "file_name": file_name, "height": int(info["height"]),
                          "width": int(info["width"]), "anns": json.dumps(anns)})
        return items

    def parse(self, item: dict[str, Any], masks_out_uri: str | None = None) -> dict[str, Any]:
        """Manifest record of one image; writes its semantic mask to ``masks_out_uri/{image_id}.png``."""
        image_id, split = str(item["image_id"]), str(item["split"])
        height, width = int(item["height"]), int(item["width"])
        ann_uri = self.ann_uri(split)
        image_uri = self.image_uri(split, str(item["file_name"]))
        if not storage.exists(image_uri):
            raise BadItemError(image_uri, "image file is missing")
        image = decode_image(storage.read_bytes(image_uri), image_uri)
        if image.shape[:2] != (height, width):
            raise BadItemError(image_uri, f"image size {image.shape[1]}x{image.shape[0]} != annotated size "
                                          f"{width}x{height}")

        anns = item["anns"]
        anns = json.loads(anns) if isinstance(anns, str) else list(anns)
        painted: list[tuple[float, int, np.ndarray]] = []
        crowd = np.zeros((height, width), bool)
        tags: set[int] = set()
        boxes: list[list[int]] = []
        for ann in anns:
            category_id = int(ann["category_id"])
            label = COCO_CATEGORY_TO_LABEL.get(category_id)
            if label is None:
                raise BadItemError(ann_uri, f"unknown category id {category_id} (image {image_id})")
            try:
                region = _segmentation_mask(ann["segmentation"], height, width)
            except (ValueError, TypeError, KeyError) as error:
                raise BadItemError(ann_uri, f"bad segmentation of a category {category_id} object "
                                            f"(image {image_id}): {error}") from error
            tags.add(label)  # crowds count too: the class is present even where its pixels are ignored
            if int(ann.get("iscrowd", 0)):
                crowd |= region
                continue
            painted.append((float(ann.get("area", region.sum())), label, region))
            box = self._box(ann.get("bbox"), height, width)
            if box is not None:
                boxes.append([label, *box])

        semantic = np.zeros((height, width), np.uint8)
        semantic[crowd] = IGNORE_LABEL
        # Largest first, so small objects lying on big ones stay visible; instances win over crowd regions.
        for _, label, region in sorted(painted, key=lambda entry: -entry[0]):
            semantic[region] = label

        mask_uri: str | None = None
        if masks_out_uri is not None:
            mask_uri = storage.join(masks_out_uri, f"{image_id}.png")
            storage.write_bytes(mask_uri, encode_label_png(semantic))

        scribble_uri: str | None = storage.join(self.root, "scribbles", split, f"{image_id}.png")
        if storage.exists(scribble_uri):
            scribble = decode_label_png(storage.read_bytes(scribble_uri), scribble_uri)
            check_label_map(scribble, scribble_uri, len(COCO_CLASSES), (height, width), "scribble")
        else:
            scribble_uri = None

        return {"image_id": image_id, "split": split, "image_uri": image_uri, "height": height, "width": width,
                "tags": sorted(tags), "boxes": boxes, "mask_uri": mask_uri, "scribble_uri": scribble_uri}

    @staticmethod
    def _box(bbox: Any, height: int, width: int) -> list[int] | None:
        """COCO ``[x, y, w, h]`` floats -> integer ``[x1, y1, x2, y2]`` covering it, clipped to the image."""
        if not bbox or len(bbox) != 4:
            return None
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = max(0, math.floor(x)), max(0, math.floor(y))
        x2, y2 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
        return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None
