"""Class names, label ids and the VOC colour map of the two supported dataset formats."""

from __future__ import annotations

VOC_CLASSES: list[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

# The 80 COCO 'thing' categories in category-id order; the official ids skip 12, 26, 29, 30, 45, 66, 68, 69,
# 71 and 83, so masks use the contiguous labels 1..80 instead.
_COCO_THINGS: list[tuple[int, str]] = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]

COCO_CATEGORY_IDS: list[int] = [cat_id for cat_id, _ in _COCO_THINGS]
COCO_CLASSES: list[str] = ["background"] + [name for _, name in _COCO_THINGS]
# Official category id -> contiguous label 1..80 (0 is background).
COCO_CATEGORY_TO_LABEL: dict[int, int] = {cat_id: label for label, cat_id in enumerate(COCO_CATEGORY_IDS, start=1)}
COCO_LABEL_TO_CATEGORY: dict[int, int] = {label: cat_id for cat_id, label in COCO_CATEGORY_TO_LABEL.items()}


def class_names(fmt: str) -> list[str]:
    """Names of all labels (index 0 = background) of the ``voc`` or ``coco`` format."""
    if fmt == "voc":
        return list(VOC_CLASSES)
    if fmt == "coco":
        return list(COCO_CLASSES)
    raise ValueError(f"unknown dataset format {fmt!r} (expected 'voc' or 'coco')")


def voc_palette() -> list[int]:
    """The standard 256-colour PASCAL VOC colour map as 768 ints (r, g, b per index)."""
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        # Spreads the bits of the index over the high bits of the three channels, as VOC's devkit does.
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette
