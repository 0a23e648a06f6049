"""Image-level tags for the classifier, from whichever weak supervision the config names."""

from __future__ import annotations

from typing import Any

import numpy as np

from wsss_ray.core.items import BadItemError
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.data.image_io import read_label


def weak_tags(record: dict[str, Any], supervision: str) -> list[int]:
    """Foreground class ids (1-based) the image is known to contain.

    Tags come from the annotation; for box supervision from the boxes' classes; for scribbles they are read
    off the scribble PNG (CDSP), since a scribble dataset has nothing else.
    """
    if supervision == "scribbles":
        if not record.get("scribble_uri"):
            raise BadItemError(record["image_uri"], "scribble supervision but the image has no scribble file")
        scribble = read_label(record["scribble_uri"])
        return sorted(int(v) for v in np.unique(scribble) if v not in (0, IGNORE_LABEL))
    if supervision == "boxes":
        return sorted({int(box[0]) for box in record["boxes"]})
    return sorted(int(t) for t in record["tags"])
