"""The rows that travel between stages, as typed dicts (Ray Data rows are plain dicts).

A ``ManifestRecord`` is one usable image of the ingest stage's ``manifest.parquet``; a ``TrainingRecord`` is one
row of ``train_seg``: the image, its pseudo-mask and the other maps its loss reads; a ``FailureRow`` says which
item a stage skipped and why.
"""

from __future__ import annotations

from typing import TypedDict


class ManifestRecord(TypedDict):
    image_id: str
    split: str
    image_uri: str
    height: int
    width: int
    tags: list[int]  # foreground class ids present (1-based), from the annotation
    boxes: list[list[int]]  # [class id, x1, y1, x2, y2] per box (empty without box annotations)
    mask_uri: str | None  # ground truth, for scoring only
    scribble_uri: str | None


class TrainingRecord(TypedDict, total=False):
    image_id: str
    image_uri: str
    label_uri: str  # the pseudo-mask
    scribble_uri: str | None
    label_list: list[int]  # MSPN (its objective's record_fields): background, then the weak tags
    # plus ``<output>_uri`` for every other output of the generator (``retrieved_uri``, ``agreement_uri``, ...)


class FailureRow(TypedDict):
    image_id: str
    reason: str
