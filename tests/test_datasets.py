"""Dataset layer: class tables, image I/O, the toy generator and the VOC / COCO readers (incl. broken files)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from wsss_ray.core import storage
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.data.classes import (
    COCO_CATEGORY_IDS,
    COCO_CATEGORY_TO_LABEL,
    COCO_CLASSES,
    VOC_CLASSES,
    class_names,
    voc_palette,
)
from wsss_ray.data.coco import CocoReader
from wsss_ray.data.image_io import (
    BadItemError,
    decode_image,
    decode_label_png,
    encode_jpeg,
    encode_label_png,
    read_image,
    read_label,
)
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.data.voc import VocReader

NUM_CLASSES = 4
RECORD_KEYS = {"image_id", "split", "image_uri", "height", "width", "tags", "boxes", "mask_uri", "scribble_uri"}


def _toy(root: Path, fmt: str, seed: int = 0, size: int = 64) -> Path:
    make_toy_dataset(str(root), fmt=fmt, num_train=10, num_val=4, image_size=size, num_classes=NUM_CLASSES,
                     max_objects=3, seed=seed)
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _toy(tmp_path_factory.mktemp("voc"), "voc")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _toy(tmp_path_factory.mktemp("coco"), "coco")


@pytest.fixture()
def broken_voc(voc_root: Path, tmp_path: Path) -> Path:
    """A private copy of the VOC toy set, for tests that break files in it."""
    return Path(shutil.copytree(voc_root, tmp_path / "voc"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_boxes_enclose(mask: np.ndarray, tags: list[int], boxes: list[list[int]]) -> None:
    """Every tag's pixels lie inside that class's boxes, and every box holds pixels of its class."""
    for label, x1, y1, x2, y2 in boxes:
        assert label in tags
        assert 0 <= x1 < x2 <= mask.shape[1] and 0 <= y1 < y2 <= mask.shape[0]
        assert (mask[y1:y2, x1:x2] == label).any()
    for label in tags:
        covered = np.zeros(mask.shape, bool)
        for box_label, x1, y1, x2, y2 in boxes:
            if box_label == label:
                covered[y1:y2, x1:x2] = True
        assert covered.any(), f"class {label} has no box"
        assert not ((mask == label) & ~covered).any(), f"class {label} pixels outside its boxes"


# --------------------------------------------------------------------------------------------- classes, I/O


def test_class_tables() -> None:
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[1] == "aeroplane"
    assert VOC_CLASSES[20] == "tvmonitor" and VOC_CLASSES[15] == "person"
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[1] == "person" and COCO_CLASSES[80] == "toothbrush"
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[-1] == 90 and 12 not in COCO_CATEGORY_IDS
    assert COCO_CATEGORY_TO_LABEL[13] == 12 and COCO_CLASSES[12] == "stop sign"
    assert class_names("voc") == VOC_CLASSES and class_names("coco") == COCO_CLASSES
    with pytest.raises(ValueError):
        class_names("cityscapes")
    palette = voc_palette()
    assert len(palette) == 768 and palette[3:6] == [128, 0, 0] and palette[-3:] == [224, 224, 192]


def test_label_png_round_trip_and_modes(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 20], [255, 3, 0]], np.uint8)
    data = encode_label_png(mask)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P" and image.getpalette()[255 * 3: 256 * 3] == [224, 224, 192]
    assert np.array_equal(decode_label_png(data, "m.png"), mask)
    assert data == encode_label_png(mask.astype(np.int64))  # same labels, same bytes
    gray = io.BytesIO()
    Image.fromarray(mask).save(gray, format="PNG")
    assert np.array_equal(decode_label_png(gray.getvalue(), "g.png"), mask)
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(rgb, format="PNG")
    with pytest.raises(BadItemError, match="mode 'RGB'") as info:
        decode_label_png(rgb.getvalue(), "rgb.png")
    assert info.value.file == "rgb.png"

    picture = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    jpeg = encode_jpeg(picture)
    assert decode_image(jpeg, "x.jpg").shape == (8, 10, 3)
    with pytest.raises(BadItemError, match="cannot decode") as info:
        decode_image(jpeg[: len(jpeg) // 2], "half.jpg")
    assert info.value.file == "half.jpg"
    missing = str(tmp_path / "nope.png")
    with pytest.raises(BadItemError) as info:
        read_label(missing)
    assert info.value.file == missing


def test_bad_item_error_format_and_pickle() -> None:
    error = BadItemError("s3://b/x.jpg", "image file is truncated")
    assert str(error) == "s3://b/x.jpg: image file is truncated"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.file, copy.reason, str(copy)) == (error.file, error.reason, str(error))


# --------------------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_toy_dataset_is_deterministic(tmp_path: Path, fmt: str) -> None:
    first = _files(_toy(tmp_path / "a", fmt, size=48))
    second = _files(_toy(tmp_path / "b", fmt, size=48))
    other = _files(_toy(tmp_path / "c", fmt, seed=1, size=48))
    assert first == second
    assert first.keys() == other.keys()
    images = [name for name in first if name.endswith(".jpg")]
    assert len(images) == 14
    assert all(first[name] != other[name] for name in images)


def test_toy_voc_layout(voc_root: Path) -> None:
    lists = {name: (voc_root / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()
             for name in ("train", "val", "train_aug", "trainval")}
    assert len(lists["train"]) == 10 and len(lists["val"]) == 4 and lists["train_aug"] == lists["train"]
    assert lists["trainval"] == lists["train"] + lists["val"] and lists["train"][0] == "2007_000001"
    image_id = lists["val"][0]
    image = Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg")
    assert image.format == "JPEG" and image.size == (64, 64)
    void = decode_label_png((voc_root / "SegmentationClass" / f"{image_id}.png").read_bytes(), "v")
    aug = decode_label_png((voc_root / "SegmentationClassAug" / f"{image_id}.png").read_bytes(), "a")
    assert (void == IGNORE_LABEL).any() and not (aug == IGNORE_LABEL).any()
    assert np.array_equal(void[void != IGNORE_LABEL], aug[void != IGNORE_LABEL])
    # The void band sits on object boundaries only.
    assert set(np.unique(aug[void == IGNORE_LABEL])) - {0} and (void == 0).sum() > 0.3 * void.size


def test_toy_objects_stand_out_from_their_surroundings(voc_root: Path) -> None:
    """Colour edges follow object boundaries: an object differs from the ring of background around it."""
    from scipy import ndimage

    contrasts = []
    for image_id in (voc_root / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split():
        image = read_image(str(voc_root / "JPEGImages" / f"{image_id}.jpg")).astype(float)
        mask = read_label(str(voc_root / "SegmentationClassAug" / f"{image_id}.png"))
        objects = mask > 0
        ring = ndimage.binary_dilation(objects, iterations=3) & ~objects
        contrasts.append(np.linalg.norm(image[objects].mean(0) - image[ring].mean(0)))
    assert np.median(contrasts) > 60


# --------------------------------------------------------------------------------------------- VOC reader


def test_voc_records_agree_with_masks(voc_root: Path) -> None:
    reader = VocReader(str(voc_root))
    items = reader.items("train") + reader.items("val")
    assert len(items) == 14 and items[0] == {"image_id": "2007_000001", "split": "train"}
    json.dumps(items)
    seen: set[int] = set()
    for item in items:
        record = reader.parse(item)
        assert set(record) == RECORD_KEYS
        json.dumps(record)
        assert (record["height"], record["width"]) == (64, 64)
        assert record["mask_uri"] == storage.join(str(voc_root), "SegmentationClassAug", f"{item['image_id']}.png")
        mask = read_label(record["mask_uri"])
        tags = record["tags"]
        assert tags and tags == sorted(set(tags)) and all(1 <= t <= NUM_CLASSES for t in tags)
        assert set(np.unique(mask)) - {0} == set(tags)
        _check_boxes_enclose(mask, tags, record["boxes"])
        scribble = read_label(record["scribble_uri"])
        scribbled = {int(v) for v in np.unique(scribble)} - {IGNORE_LABEL}
        assert scribbled <= set(tags) | {0} and set(tags) <= scribbled
        # Scribble pixels carry the class that is really there.
        on = scribble != IGNORE_LABEL
        assert (scribble[on] == mask[on]).mean() > 0.99
        seen |= set(tags)
    assert len(seen) >= 3


def test_voc_without_xml_takes_tags_from_mask_and_falls_back_to_plain_masks(broken_voc: Path) -> None:
    reader = VocReader(str(broken_voc))
    item = reader.items("val")[1]
    image_id = item["image_id"]
    expected = reader.parse(item)
    (broken_voc / "Annotations" / f"{image_id}.xml").unlink()
    (broken_voc / "SegmentationClassAug" / f"{image_id}.png").unlink()
    record = reader.parse(item)
    assert record["tags"] == expected["tags"] and record["boxes"] == []
    assert record["mask_uri"] == storage.join(str(broken_voc), "SegmentationClass", f"{image_id}.png")


def test_voc_split_lists(broken_voc: Path) -> None:
    reader = VocReader(str(broken_voc))
    main = broken_voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    shutil.move(broken_voc / "ImageSets" / "Segmentation" / "val.txt", main / "val.txt")
    assert [i["image_id"] for i in reader.items("val")] == (main / "val.txt").read_text().split()
    missing = storage.join(str(broken_voc), "ImageSets", "Segmentation", "test.txt")
    with pytest.raises(FileNotFoundError, match="test.txt") as info:
        reader.items("test")
    assert missing in str(info.value)


def _set_xml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _break(root: Path, image_id: str, how: str) -> str:
    """Break one file of ``image_id``; returns the path the error must name."""
    jpeg = root / "JPEGImages" / f"{image_id}.jpg"
    xml = root / "Annotations" / f"{image_id}.xml"
    aug = root / "SegmentationClassAug" / f"{image_id}.png"
    scribble = root / "Scribbles" / f"{image_id}.png"
    if how == "truncated jpeg":
        jpeg.write_bytes(jpeg.read_bytes()[:300])
        return str(jpeg)
    if how == "missing jpeg":
        jpeg.unlink()
        return str(jpeg)
    if how == "mask of wrong size":
        aug.write_bytes(encode_label_png(np.zeros((32, 40), np.uint8)))
        return str(aug)
    if how == "unknown class name":
        name = xml.read_text().split("<name>")[1].split("</name>")[0]
        _set_xml(xml, f"<name>{name}</name>", "<name>unicorn</name>")
        return str(xml)
    if how == "label out of range":
        mask = decode_label_png(aug.read_bytes(), str(aug))
        mask[0, 0] = 50
        aug.write_bytes(encode_label_png(mask))
        return str(aug)
    if how == "missing annotation":
        xml.unlink()
        aug.unlink()
        (root / "SegmentationClass" / f"{image_id}.png").unlink()
        return str(xml)
    if how == "box outside image":
        xmax = xml.read_text().split("<xmax>")[1].split("</xmax>")[0]
        _set_xml(xml, f"<xmax>{xmax}</xmax>", "<xmax>65</xmax>")
        return str(xml)
    if how == "scribble of wrong size":
        scribble.write_bytes(encode_label_png(np.full((64, 63), 255, np.uint8)))
        return str(scribble)
    if how == "corrupt mask":
        aug.write_bytes(b"not a png at all")
        return str(aug)
    raise AssertionError(how)


@pytest.mark.parametrize(("how", "reason"), [
    ("truncated jpeg", "cannot decode"), ("missing jpeg", "missing"), ("mask of wrong size", "40x32"),
    ("unknown class name", "unicorn"), ("label out of range", "[50]"), ("missing annotation", "annotation"),
    ("box outside image", "outside"), ("scribble of wrong size", "63x64"), ("corrupt mask", "cannot decode"),
])
def test_voc_broken_files_name_the_file(broken_voc: Path, how: str, reason: str) -> None:
    reader = VocReader(str(broken_voc))
    items = reader.items("train")
    target = items[3]
    bad_file = _break(broken_voc, target["image_id"], how)
    with pytest.raises(BadItemError) as info:
        reader.parse(target)
    assert info.value.file == bad_file
    assert reason in info.value.reason
    assert str(info.value).startswith(bad_file + ": ")
    # Only the broken item fails.
    assert reader.parse(items[4])["image_id"] == items[4]["image_id"]


# --------------------------------------------------------------------------------------------- COCO reader


def test_coco_records_agree_with_masks(coco_root: Path, tmp_path: Path) -> None:
    reader = CocoReader(str(coco_root))
    items = reader.items("train2014")
    assert len(items) == 10 and len(reader.items("val2014")) == 4
    assert items[0]["image_id"] == "COCO_train2014_000000000001"
    json.dumps(items)  # driver-side items travel through Ray Data
    pickle.loads(pickle.dumps(reader))
    masks_out = str(tmp_path / "masks")
    seen: set[int] = set()
    for item in items:
        record = reader.parse(item, masks_out)
        assert set(record) == RECORD_KEYS
        json.dumps(record)
        assert record["image_uri"] == storage.join(str(coco_root), "train2014", f"{item['image_id']}.jpg")
        assert record["mask_uri"] == storage.join(masks_out, f"{item['image_id']}.png")
        mask = read_label(record["mask_uri"])
        assert mask.shape == (record["height"], record["width"]) == (64, 64)
        tags = record["tags"]
        assert tags and set(np.unique(mask)) - {0} == set(tags) and max(tags) <= NUM_CLASSES
        _check_boxes_enclose(mask, tags, record["boxes"])
        # The rendered mask is the union of the instance masks, each with its contiguous label.
        expected = np.zeros_like(mask)
        for ann in json.loads(item["anns"]):
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            expected[mask_utils.decode(rle).astype(bool)] = COCO_CATEGORY_TO_LABEL[ann["category_id"]]
        assert np.array_equal(mask, expected)
        assert record["scribble_uri"] == storage.join(str(coco_root), "scribbles", "train2014",
                                                      f"{item['image_id']}.png")
        scribble = read_label(record["scribble_uri"])
        assert {int(v) for v in np.unique(scribble)} - {IGNORE_LABEL} <= set(tags) | {0}
        seen |= set(tags)
    assert len(seen) >= 3
    assert reader.parse(items[0])["mask_uri"] is None


def test_coco_json_is_standard(coco_root: Path) -> None:
    data = json.loads((coco_root / "annotations" / "instances_val2014.json").read_text())
    assert {"images", "annotations", "categories"} <= set(data)
    assert [c["id"] for c in data["categories"]] == COCO_CATEGORY_IDS
    assert data["categories"][0]["name"] == "person"
    ann = data["annotations"][0]
    assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4 and isinstance(ann["segmentation"]["counts"], str)
    assert ann["area"] > 0


def test_coco_crowd_regions_are_ignored_and_small_objects_stay_on_top(coco_root: Path, tmp_path: Path) -> None:
    reader = CocoReader(str(coco_root))
    item = dict(reader.items("val2014")[0])
    big = np.zeros((64, 64), np.uint8)
    big[10:50, 10:50] = 1
    small = np.zeros((64, 64), np.uint8)
    small[20:30, 20:30] = 1
    crowd = [[0, 60, 8, 60, 8, 64, 0, 64]]  # a polygon, as COCO crowds sometimes are
    anns = [
        {"bbox": [20, 20, 10, 10], "category_id": 3, "segmentation": _rle(small), "iscrowd": 0, "area": 100.0},
        {"bbox": [10, 10, 40, 40], "category_id": 1, "segmentation": _rle(big), "iscrowd": 0, "area": 1600.0},
        {"bbox": [0, 60, 8, 4], "category_id": 2, "segmentation": crowd, "iscrowd": 1, "area": 32.0},
    ]
    item["anns"] = json.dumps(anns)
    record = reader.parse(item, str(tmp_path))
    mask = read_label(record["mask_uri"])
    assert mask[25, 25] == 3 and mask[15, 15] == 1 and mask[62, 4] == IGNORE_LABEL and mask[5, 5] == 0
    assert record["tags"] == [1, 2, 3]
    assert record["boxes"] == [[3, 20, 20, 30, 30], [1, 10, 10, 50, 50]]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_coco_broken_items(coco_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(coco_root, tmp_path / "coco"))
    ann_path = root / "annotations" / "instances_train2014.json"
    data = json.loads(ann_path.read_text())
    data["annotations"][0]["category_id"] = 999  # not a COCO category
    bad_image = data["annotations"][0]["image_id"]
    resized = next(i for i in data["images"] if i["id"] != bad_image)
    resized["height"] = 70
    ann_path.write_text(json.dumps(data))
    reader = CocoReader(str(root))
    items = {item["coco_id"]: item for item in reader.items("train2014")}

    with pytest.raises(BadItemError, match="999") as info:
        reader.parse(items[bad_image], str(tmp_path / "masks"))
    assert info.value.file == str(ann_path)
    with pytest.raises(BadItemError, match="64x64 != annotated size 64x70") as info:
        reader.parse(items[resized["id"]], None)
    assert info.value.file == str(root / "train2014" / resized["file_name"])

    victim = next(i for i in items.values() if i["coco_id"] not in (bad_image, resized["id"]))
    jpeg = root / "train2014" / victim["file_name"]
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    with pytest.raises(BadItemError, match="cannot decode") as info:
        reader.parse(victim, None)
    assert info.value.file == str(jpeg)
    jpeg.unlink()
    with pytest.raises(BadItemError, match="missing") as info:
        reader.parse(victim, None)
    assert info.value.file == str(jpeg)

    missing = os.path.join(str(root), "annotations", "instances_test2014.json")
    with pytest.raises(FileNotFoundError) as error:
        reader.items("test2014")
    assert missing in str(error.value)


# ------------------------------------------------------------------------------- val ground truth (VOC)


def test_val_ground_truth_official_reads_segmentation_class_for_val_only(broken_voc: Path) -> None:
    from wsss_ray.core.config_base import DatasetConfig
    from wsss_ray.stages.ingest import ground_truth_sources, make_reader

    def records(**fields: str) -> list[dict]:
        reader = make_reader(DatasetConfig(root=str(broken_voc), train_split="train", val_split="val", **fields))
        return [reader.parse(item) for item in reader.items("train") + reader.items("val")]

    official = records()
    for record in official:
        folder = "SegmentationClass" if record["split"] == "val" else "SegmentationClassAug"
        assert record["mask_uri"] == storage.join(str(broken_voc), folder, f"{record['image_id']}.png")
    # The toy set's official masks carry VOC's void band (255 on class boundaries); its Aug masks do not, so the
    # choice is visible: every val image differs between the two folders only on void pixels.
    for record in (r for r in official if r["split"] == "val"):
        truth = read_label(record["mask_uri"])
        aug = read_label(storage.join(str(broken_voc), "SegmentationClassAug", f"{record['image_id']}.png"))
        void = truth == IGNORE_LABEL
        assert void.any() and np.array_equal(truth[~void], aug[~void]) and not (aug == IGNORE_LABEL).any()
    assert ground_truth_sources(official, ["train", "val"], "voc") == {
        "train": "SegmentationClassAug", "val": "SegmentationClass"}

    aug = records(val_ground_truth="aug")  # BANA / CDSP: Aug for every split
    assert all("/SegmentationClassAug/" in r["mask_uri"] for r in aug)
    assert ground_truth_sources(aug, ["train", "val"], "voc")["val"] == "SegmentationClassAug"

    # A val image without an official mask falls back to Aug, and the sources say so with counts.
    missing = official[-1]["image_id"]
    (broken_voc / "SegmentationClass" / f"{missing}.png").unlink()
    assert ground_truth_sources(records(), ["val"], "voc") == {
        "val": "SegmentationClass (3) + SegmentationClassAug (1)"}


def test_val_ground_truth_is_in_the_ingest_key_where_it_changes_the_manifest() -> None:
    from wsss_ray.core.config_base import DatasetConfig, config_hash
    from wsss_ray.pipeline import ingest_key

    # The key of a config written before the field existed (the same dump, by hand): its manifests scored val
    # against SegmentationClassAug, which is what ``aug`` does, so ``aug`` keeps that key and ``official`` does not.
    old = config_hash({"format": "voc", "root": "r", "train_split": "train_aug", "val_split": "val",
                       "supervision": "tags", "max_images": None})
    assert ingest_key(DatasetConfig(root="r", val_ground_truth="aug")) == old
    assert ingest_key(DatasetConfig(root="r")) != old
    # COCO has one ground truth: the field changes nothing there, nor its key.
    coco = {"format": "coco", "root": "r", "train_split": "train_aug", "val_split": "val", "supervision": "tags",
            "max_images": None}
    assert ingest_key(DatasetConfig(root="r", format="coco")) == config_hash(coco)
    assert DatasetConfig.model_validate(DatasetConfig(root="r").model_dump()).val_ground_truth == "official"
    with pytest.raises(ValueError, match="val_ground_truth"):
        DatasetConfig(root="r", format="coco", val_ground_truth="aug")


def test_metrics_ground_truth_is_read_from_the_manifest(voc_root: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from wsss_ray.core.stage_dir import StageDir
    from wsss_ray.pipeline_config import parse_config
    from wsss_ray.stages.evaluate import ground_truth as _ground_truth
    from wsss_ray.stages.ingest import MANIFEST_SCHEMA, load_manifest, make_reader

    config = parse_config({"output": str(tmp_path), "dataset": {"root": str(voc_root), "train_split": "train",
                                                                "val_split": "val"}}, source="test")
    reader = make_reader(config.dataset)
    rows = [reader.parse(item) for item in reader.items("train") + reader.items("val")]
    stage = StageDir.create(str(tmp_path), "ingest", "k")
    storage.write_parquet(stage.path("manifest.parquet"), pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    assert _ground_truth(config, load_manifest(stage)) == {"train": "SegmentationClassAug", "val": "SegmentationClass"}
