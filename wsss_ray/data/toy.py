"""Seeded synthetic dataset in VOC or COCO layout, small enough for CPU tests yet hard enough to be useful.

Each class has its own shape, texture and typical hue (hues overlap between classes), objects are nearly
uniform inside and contrast with their local background, and backgrounds are cluttered with smooth colour
noise and distractor blobs/lines that belong to no class. So a classifier trained on image tags must learn
shape and texture (its CAMs then point at objects), and a colour-based DenseCRF can snap CAMs to edges.
Every file is a pure function of the arguments: the same call writes byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import os
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, VOC_CLASSES
from wsss_ray.data.image_io import encode_jpeg, encode_label_png

SHAPES = ("disc", "square", "triangle", "plus", "ring", "star", "crescent", "ell", "half_disc", "frame")
# (kind, period in px, orientation in degrees); all 20 distinct so classes sharing a shape still differ.
TEXTURES: tuple[tuple[str, float, float], ...] = (
    ("stripes", 6, 0), ("checker", 8, 0), ("dots", 6, 0), ("stripes", 4, 45), ("stripes", 8, 90),
    ("rings", 6, 0), ("stripes", 5, 135), ("checker", 4, 45), ("dots", 9, 0), ("stripes", 10, 30),
    ("waves", 8, 0), ("stripes", 3, 90), ("checker", 12, 0), ("dots", 4, 0), ("stripes", 7, 60),
    ("rings", 10, 0), ("waves", 5, 90), ("stripes", 12, 150), ("checker", 6, 30), ("flat", 1, 0),
)
TEXTURE_AMPLITUDE = 0.09  # modest: objects stay nearly uniform in colour, as the CRF expects
_GOLDEN = 0.6180339887

COCO_SUPERCATEGORIES: dict[str, str] = {
    **dict.fromkeys(["person"], "person"),
    **dict.fromkeys(["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"], "vehicle"),
    **dict.fromkeys(["traffic light", "fire hydrant", "stop sign", "parking meter", "bench"], "outdoor"),
    **dict.fromkeys(["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"],
                    "animal"),
    **dict.fromkeys(["backpack", "umbrella", "handbag", "tie", "suitcase"], "accessory"),
    **dict.fromkeys(["frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
                     "skateboard", "surfboard", "tennis racket"], "sports"),
    **dict.fromkeys(["bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"], "kitchen"),
    **dict.fromkeys(["banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
                     "cake"], "food"),
    **dict.fromkeys(["chair", "couch", "potted plant", "bed", "dining table", "toilet"], "furniture"),
    **dict.fromkeys(["tv", "laptop", "mouse", "remote", "keyboard", "cell phone"], "electronic"),
    **dict.fromkeys(["microwave", "oven", "toaster", "sink", "refrigerator"], "appliance"),
    **dict.fromkeys(["book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"], "indoor"),
}


# --------------------------------------------------------------------------------------------- drawing


def shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in its own frame, where the shape fits the unit disc."""
    r = np.hypot(u, v)
    if kind == "disc":
        return r <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if kind == "triangle":
        inside = np.ones(u.shape, bool)
        for angle in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
        return inside
    if kind == "plus":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if kind == "ring":
        return (r <= 1.0) & (r >= 0.52)
    if kind == "star":
        theta = np.arctan2(v, u)
        return r <= 0.55 + 0.45 * np.cos(5 * theta) ** 2
    if kind == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) >= 0.75)
    if kind == "ell":
        return (((u >= -0.8) & (u <= -0.2) & (np.abs(v) <= 0.85))
                | ((v >= 0.25) & (v <= 0.85) & (u >= -0.8) & (u <= 0.8)))
    if kind == "half_disc":
        return (r <= 1.0) & (v >= -0.15)
    if kind == "frame":
        box = np.maximum(np.abs(u), np.abs(v))
        return (box <= 0.75) & (box >= 0.42)
    raise ValueError(f"unknown shape {kind!r}")


def texture(kind: str, period: float, degrees: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Texture values in [-1, 1] in image coordinates, so stripe orientation is part of the class identity."""
    angle = np.deg2rad(degrees)
    a = x * np.cos(angle) + y * np.sin(angle)
    b = -x * np.sin(angle) + y * np.cos(angle)
    if kind == "stripes":
        return np.sign(np.sin(2 * np.pi * a / period))
    if kind == "checker":
        return np.where((np.floor(a / period) + np.floor(b / period)) % 2 == 0, 1.0, -1.0)
    if kind == "dots":
        da = (a % period) - period / 2
        db = (b % period) - period / 2
        return np.where(np.hypot(da, db) <= period / 4, -1.0, 0.6)
    if kind == "rings":
        return np.sign(np.sin(2 * np.pi * np.hypot(x % 32 - 16, y % 32 - 16) / period))
    if kind == "waves":
        return np.sign(np.sin(2 * np.pi * (a + 2.0 * np.sin(2 * np.pi * b / (3 * period))) / period))
    return np.zeros_like(x)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid, bilinearly upsampled to size×size."""
    coarse = rng.uniform(0.0, 1.0, (cells, cells, channels))
    return ndimage.zoom(coarse, (size / cells, size / cells, 1), order=1, mode="nearest")[:size, :size]


def _stroke(rng: np.random.Generator, depth: np.ndarray, start: tuple[int, int], length: float,
            min_depth: float) -> list[tuple[int, int]]:
    """A skeleton-like polyline: from ``start`` walk both ways, each step turning toward the deepest interior."""
    size_y, size_x = depth.shape
    points = [start]
    heading = rng.uniform(0, 2 * np.pi)
    for direction in (heading, heading + np.pi):
        y, x = float(start[0]), float(start[1])
        travelled = 0.0
        while travelled < length / 2:
            best = None
            # Straight on while that stays deep enough inside, else the turn that stays deepest: straight
            # strokes in compact shapes, ridge-following ones in rings, frames and crosses.
            for turn in (0.0, -0.4, 0.4, -0.8, 0.8):
                ny, nx = y + 2 * np.sin(direction + turn), x + 2 * np.cos(direction + turn)
                iy, ix = round(ny), round(nx)
                if 0 <= iy < size_y and 0 <= ix < size_x and depth[iy, ix] >= min_depth:
                    if turn == 0.0:
                        best = (0.0, ny, nx, direction)
                        break
                    if best is None or depth[iy, ix] > best[0]:
                        best = (float(depth[iy, ix]), ny, nx, direction + turn)
            if best is None:
                break
            _, y, x, direction = best
            points.append((round(y), round(x)))
            travelled += 2
    return points


def _paint_stroke(target: np.ndarray, points: list[tuple[int, int]], allowed: np.ndarray, label: int) -> None:
    # Consecutive points are 2 px apart, so 3×3 stamps give a connected stroke about 3 px wide.
    stamp = np.zeros(target.shape, bool)
    for y, x in points:
        stamp[max(0, y - 1): y + 2, max(0, x - 1): x + 2] = True
    target[stamp & allowed] = label


def render_image(rng: np.random.Generator, size: int, num_classes: int, max_objects: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One sample: RGB image, semantic labels (0 = background, c+1 = class c), instance ids, scribbles, objects.

    Objects are dicts with ``cls`` (0-based foreground class) and ``box`` ([x1, y1, x2, y2], exclusive end)
    of the visible region. The steps draw from ``rng`` in a fixed order: the seed defines the whole sample.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = _background(rng, size, xx, yy)
    labels, instances, objects = _place_objects(rng, image, size, num_classes, max_objects, xx, yy)
    scribbles = _scribbles(rng, size, labels, instances, objects)
    # Mild sensor noise so flat regions are not perfectly flat (the CRF must cope with it).
    image = image + rng.normal(0.0, 0.012, image.shape)
    rgb = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return rgb, labels, instances, scribbles, objects


def _background(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Smooth, fairly desaturated colour noise, with distractors that belong to no class: irregular blobs and
    thick polylines in arbitrary, even saturated, colours, so "a colourful thing" is not evidence for a class."""
    hue = smooth_field(rng, size, 3, 1)[..., 0] + rng.uniform()
    sat = 0.05 + 0.3 * smooth_field(rng, size, 4, 1)[..., 0]
    val = 0.2 + 0.65 * smooth_field(rng, size, 5, 1)[..., 0]
    image = _hsv_to_rgb(hue % 1.0, sat, val)
    for _ in range(int(rng.integers(1, 4))):
        field = smooth_field(rng, size, int(rng.integers(3, 6)), 1)[..., 0]
        blob = field > np.quantile(field, 1.0 - rng.uniform(0.03, 0.1))
        image[blob] = hsv(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.25, 0.95))
    for _ in range(int(rng.integers(0, 3))):
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        direction = p1 - p0
        t = np.clip(((xx - p0[0]) * direction[0] + (yy - p0[1]) * direction[1]) / max(direction @ direction, 1e-6),
                    0, 1)
        dist = np.hypot(xx - (p0[0] + t * direction[0]), yy - (p0[1] + t * direction[1]))
        image[dist <= rng.uniform(0.8, 2.0) * size / 128] = hsv(rng.uniform(), rng.uniform(0.2, 0.9),
                                                                rng.uniform(0.25, 0.95))
    return image


def _place_objects(rng: np.random.Generator, image: np.ndarray, size: int, num_classes: int, max_objects: int,
                   xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Paint 1..max_objects textured shapes into ``image``; returns (labels, instance ids, objects)."""
    labels = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    areas: list[int] = []
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(num_classes))
        for _attempt in range(8):
            radius = rng.uniform(0.2, 0.45) * size / 2
            cx, cy = rng.uniform(radius, size - radius, 2)
            angle = rng.uniform(0, 2 * np.pi)
            du, dv = (xx - cx) / radius, (yy - cy) / radius
            u = du * np.cos(angle) + dv * np.sin(angle)
            v = -du * np.sin(angle) + dv * np.cos(angle)
            region = shape_mask(SHAPES[cls % len(SHAPES)], u, v)
            if region.sum() < 12:
                continue
            # Partial overlap only: every earlier object must keep at least 60% of its pixels visible.
            kept = np.bincount(instances[~region].ravel(), minlength=len(areas) + 1)[1:]
            if all(k >= 0.6 * a for k, a in zip(kept, areas)):
                break
        else:
            continue
        instance_id = len(areas) + 1
        colour = _object_colour(rng, cls, num_classes, image[region].mean(axis=0))
        kind, period, degrees = TEXTURES[cls % len(TEXTURES)]
        tex = texture(kind, period * max(size / 128, 0.5), degrees, xx[region], yy[region])
        image[region] = np.clip(colour[None, :] + TEXTURE_AMPLITUDE * tex[:, None], 0, 1)
        labels[region] = cls + 1
        instances[region] = instance_id
        areas.append(int(region.sum()))
        objects.append({"cls": cls})
    return labels, instances, objects


def _scribbles(rng: np.random.Generator, size: int, labels: np.ndarray, instances: np.ndarray,
               objects: list[dict[str, Any]]) -> np.ndarray:
    """A stroke inside each object's visible part (whose box it records), plus one or two background strokes."""
    scribbles = np.full((size, size), IGNORE_LABEL, np.uint8)
    for index, obj in enumerate(objects, start=1):
        visible = instances == index
        ys, xs = np.nonzero(visible)
        obj["box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        depth = ndimage.distance_transform_edt(np.pad(visible, 1))[1:-1, 1:-1]
        start = np.unravel_index(int(np.argmax(depth)), depth.shape)
        min_depth = min(2.5, float(depth.max()))
        points = _stroke(rng, depth, (int(start[0]), int(start[1])), rng.uniform(0.4, 0.8) * np.sqrt(visible.sum()),
                         min_depth)
        _paint_stroke(scribbles, points, depth >= min(2.0, float(depth.max())), obj["cls"] + 1)
    background_depth = ndimage.distance_transform_edt(labels == 0)
    deep = np.argwhere(background_depth >= 5)
    for _ in range(int(rng.integers(1, 3)) if len(deep) else 0):
        start = deep[int(rng.integers(len(deep)))]
        points = _stroke(rng, background_depth, (int(start[0]), int(start[1])), rng.uniform(0.15, 0.3) * size, 3.0)
        _paint_stroke(scribbles, points, background_depth >= 2.0, 0)
    return scribbles


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]."""
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = np.zeros(h.shape + (3,))
    for k, choice in enumerate(choices):
        out[i == k] = choice[i == k]
    return out


def _object_colour(rng: np.random.Generator, cls: int, num_classes: int, background: np.ndarray) -> np.ndarray:
    """The class's typical hue with jitter (neighbouring classes overlap), pushed away from the background."""
    hue = cls * _GOLDEN + rng.normal(0.0, 0.07)
    colour = hsv(hue, rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.95))
    if np.linalg.norm(colour - background) < 0.4:
        # Too close to what lies beneath: flip the brightness so the object edge is a colour edge.
        value = 0.3 if background.mean() > 0.5 else 0.95
        colour = hsv(hue, rng.uniform(0.6, 0.9), value)
    return colour


def void_band(labels: np.ndarray) -> np.ndarray:
    """Labels with a 255 band (about 2 px) on every boundary between different labels, like VOC's masks."""
    edge = ndimage.maximum_filter(labels, size=3) != ndimage.minimum_filter(labels, size=3)
    out = labels.copy()
    out[edge] = IGNORE_LABEL
    return out


# --------------------------------------------------------------------------------------------- writers


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def voc_xml(image_id: str, size: int, objects: list[dict[str, Any]]) -> bytes:
    """A VOC annotation: boxes 1-based and inclusive, as in the devkit."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "wsss-ray toy dataset"
    size_el = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, key).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = VOC_CLASSES[obj["cls"] + 1]
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = "0"
        ET.SubElement(element, "difficult").text = "0"
        box = ET.SubElement(element, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_voc_sample(out_dir: str, index: int, size: int, rgb: np.ndarray, labels: np.ndarray,
                      scribbles: np.ndarray, objects: list[dict[str, Any]]) -> str:
    """One VOC sample's files (official masks with the void band, Aug masks without); returns its id."""
    image_id = f"2007_{index + 1:06d}"
    _write(os.path.join(out_dir, "JPEGImages", f"{image_id}.jpg"), encode_jpeg(rgb, quality=95))
    _write(os.path.join(out_dir, "SegmentationClass", f"{image_id}.png"), encode_label_png(void_band(labels)))
    _write(os.path.join(out_dir, "SegmentationClassAug", f"{image_id}.png"), encode_label_png(labels))
    _write(os.path.join(out_dir, "Annotations", f"{image_id}.xml"), voc_xml(image_id, size, objects))
    _write(os.path.join(out_dir, "Scribbles", f"{image_id}.png"), encode_label_png(scribbles))
    return image_id


class _CocoAnnotations:
    """The ``instances_<split>.json`` being built: images and their instance annotations (ids run on across
    splits, as in COCO)."""

    def __init__(self) -> None:
        self.ann_id = 0
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, index: int, image_id: str, size: int, instances: np.ndarray, objects: list[dict[str, Any]]) -> None:
        self.images.append({"id": index + 1, "file_name": f"{image_id}.jpg", "height": size, "width": size,
                            "license": 1})
        for instance_id, obj in enumerate(objects, start=1):
            # Real COCO masks are the visible part of each instance; so are these (no overlaps).
            rle = mask_utils.encode(np.asfortranarray((instances == instance_id).astype(np.uint8)))
            self.ann_id += 1
            self.annotations.append({
                "id": self.ann_id, "image_id": index + 1, "category_id": COCO_CATEGORY_IDS[obj["cls"]],
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0})

    def finish_split(self) -> dict[str, Any]:
        data = {
            "info": {"description": "wsss-ray toy dataset", "version": "1.0", "year": 2014},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}],
            "images": self.images, "annotations": self.annotations,
            "categories": [{"id": cat_id, "name": name, "supercategory": COCO_SUPERCATEGORIES[name]}
                           for cat_id, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]}
        self.images, self.annotations = [], []
        return data


def make_toy_dataset(out_dir: str, fmt: str = "voc", num_train: int = 64, num_val: int = 16, image_size: int = 128,
                     num_classes: int = 4, max_objects: int = 3, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic dataset under the local directory ``out_dir``; returns a summary."""
    if fmt not in ("voc", "coco"):
        raise ValueError(f"unknown dataset format {fmt!r} (expected 'voc' or 'coco')")
    if not 1 <= num_classes <= 20:
        raise ValueError("num_classes must be in 1..20")
    if num_train < 1 or num_val < 1 or max_objects < 1 or image_size < 16:
        raise ValueError("need num_train, num_val, max_objects >= 1 and image_size >= 16")
    names = (VOC_CLASSES if fmt == "voc" else COCO_CLASSES)[1: num_classes + 1]
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    if fmt == "coco":
        splits = {"train2014": splits["train"], "val2014": splits["val"]}

    ids: dict[str, list[str]] = {}
    coco_json: dict[str, dict[str, Any]] = {}
    num_objects = 0
    annotations = _CocoAnnotations()
    for split, indices in splits.items():
        ids[split] = []
        for index in indices:
            rng = np.random.default_rng([seed, index])
            rgb, labels, instances, scribbles, objects = render_image(rng, image_size, num_classes, max_objects)
            num_objects += len(objects)
            if fmt == "voc":
                image_id = _write_voc_sample(out_dir, index, image_size, rgb, labels, scribbles, objects)
            else:
                image_id = f"COCO_{split}_{index + 1:012d}"
                _write(os.path.join(out_dir, split, f"{image_id}.jpg"), encode_jpeg(rgb, quality=95))
                _write(os.path.join(out_dir, "scribbles", split, f"{image_id}.png"), encode_label_png(scribbles))
                annotations.add(index, image_id, image_size, instances, objects)
            ids[split].append(image_id)
        if fmt == "coco":
            coco_json[split] = annotations.finish_split()

    paths: dict[str, str] = {}
    if fmt == "voc":
        lists = {"train": ids["train"], "val": ids["val"], "train_aug": ids["train"],
                 "trainval": ids["train"] + ids["val"]}
        for name, split_ids in lists.items():
            paths[name] = os.path.join(out_dir, "ImageSets", "Segmentation", f"{name}.txt")
            _write(paths[name], "".join(f"{i}\n" for i in split_ids).encode())
    else:
        for split, data in coco_json.items():
            paths[split] = os.path.join(out_dir, "annotations", f"instances_{split}.json")
            _write(paths[split], json.dumps(data, separators=(",", ":")).encode())
    return {"format": fmt, "root": out_dir, "splits": {split: len(v) for split, v in ids.items()},
            "num_images": num_train + num_val, "image_size": image_size, "num_classes": num_classes,
            "classes": list(names), "labels": list(range(1, num_classes + 1)), "num_objects": num_objects,
            "paths": paths}
