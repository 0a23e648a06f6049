"""Training-time augmentation, as pure numpy/torch functions (input normalisation: ``maths.inference``).

Augmentation follows torchvision's segmentation reference and the papers: random scale, pad-and-crop to a
fixed square, random horizontal flip. The image is padded with zeros (mean colour after normalisation would be
nicer, but zeros match the reference) and the label with 255 so padding never counts as background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from wsss_ray.core.labels import IGNORE_LABEL


def resize(image: np.ndarray, label: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale an H×W×3 image bilinearly and its label map with nearest neighbour."""
    if scale == 1.0:
        return image, label
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


@dataclass(frozen=True)
class CropGeometry:
    """One random scale-pad-crop-flip, replayable on any map of the image (pseudo-mask, distance maps, a
    corrected mask carried between epochs) and invertible for label maps (``scatter_back``).

    The image is resized to ``height``×``width``, padded at the bottom/right up to ``crop`` if smaller, cropped
    at (``top``, ``left``) to ``crop``×``crop``, then mirrored when ``flip``.
    """

    height: int
    width: int
    top: int
    left: int
    crop: int
    flip: bool

    def as_array(self) -> np.ndarray:
        """int32 ``[height, width, top, left, crop, flip]``: how it travels in a Ray Data batch."""
        return np.array([self.height, self.width, self.top, self.left, self.crop, int(self.flip)], np.int32)

    @classmethod
    def from_array(cls, values: np.ndarray | list[int]) -> CropGeometry:
        h, w, top, left, crop, flip = (int(v) for v in values)
        return cls(h, w, top, left, crop, bool(flip))

    def valid(self) -> np.ndarray:
        """``(crop, crop)`` bool: crop pixels that come from the image, not from padding."""
        rows = self.top + np.arange(self.crop) < self.height
        cols = self.left + np.arange(self.crop) < self.width
        valid = rows[:, None] & cols[None, :]
        return valid[:, ::-1].copy() if self.flip else valid


def random_geometry(shape: tuple[int, int], crop_size: int, scale_range: tuple[float, float], flip: bool,
                    rng: np.random.Generator) -> CropGeometry:
    """Draw a random scale in ``scale_range``, crop position and flip for an image of ``shape`` (H, W)."""
    scale = float(rng.uniform(*scale_range))
    h, w = shape
    height, width = (max(1, round(h * scale)), max(1, round(w * scale))) if scale != 1.0 else (h, w)
    top = int(rng.integers(0, max(height, crop_size) - crop_size + 1))
    left = int(rng.integers(0, max(width, crop_size) - crop_size + 1))
    return CropGeometry(height, width, top, left, crop_size, bool(flip and rng.random() < 0.5))


def apply_geometry(array: np.ndarray, geometry: CropGeometry, pad_value: int = IGNORE_LABEL,
                   interpolation: int = Image.NEAREST) -> np.ndarray:
    """Resize (``interpolation``: bilinear for images, nearest for maps), pad with ``pad_value``, crop, flip."""
    g = geometry
    if array.shape[:2] != (g.height, g.width):
        array = np.asarray(Image.fromarray(array).resize((g.width, g.height), interpolation))
    pad_h, pad_w = max(g.crop - g.height, 0), max(g.crop - g.width, 0)
    if pad_h or pad_w:
        pad = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
        array = np.pad(array, pad, constant_values=pad_value)
    array = array[g.top:g.top + g.crop, g.left:g.left + g.crop]
    if g.flip:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def _nearest_sources(size: int, new_size: int) -> np.ndarray:
    """Source index of each output index of PIL's nearest resize along one axis (asked of PIL itself, so the
    inverse matches ``apply_geometry`` exactly whatever PIL's rounding)."""
    if size == new_size:
        return np.arange(size)
    index = Image.fromarray(np.arange(size, dtype=np.int32)[None, :])
    return np.asarray(index.resize((new_size, 1), Image.NEAREST))[0].astype(np.int64)


def scatter_back(full: np.ndarray, crop: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """Write a (corrected) crop's labels back into the full-resolution label map it was cut from.

    The inverse of ``apply_geometry`` with nearest resizing: each crop pixel that came from the image writes its
    label to the source pixel it was sampled from. Source pixels no crop pixel sampled (down-scaled crops) keep
    their label.
    """
    g = geometry
    h, w = full.shape[:2]
    crop = crop[:, ::-1] if g.flip else crop
    rows, cols = g.top + np.arange(g.crop), g.left + np.arange(g.crop)
    keep_r, keep_c = rows < g.height, cols < g.width
    src_r = _nearest_sources(h, g.height)[rows[keep_r]]
    src_c = _nearest_sources(w, g.width)[cols[keep_c]]
    out = full.copy()
    out[np.ix_(src_r, src_c)] = crop[np.ix_(keep_r, keep_c)]
    return out


def transform_boxes(boxes: np.ndarray, geometry: CropGeometry, image_shape: tuple[int, int],
                    max_boxes: int) -> np.ndarray:
    """Boxes ``[label, x1, y1, x2, y2]`` (pixels, x2/y2 exclusive) of an ``image_shape`` image → the crop's frame.

    Returns ``(max_boxes, 5)`` float32; boxes cropped away entirely are dropped and the rest padded with label −1
    rows (a fixed shape so Ray Data can batch them). Boxes beyond ``max_boxes`` are dropped, largest kept first.
    """
    g = geometry
    h, w = image_shape
    out = np.full((max_boxes, 5), -1.0, np.float32)
    kept = []
    for label, x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 5):
        sx, sy = g.width / w, g.height / h
        bx1, bx2 = np.clip([x1 * sx - g.left, x2 * sx - g.left], 0, min(g.crop, g.width - g.left))
        by1, by2 = np.clip([y1 * sy - g.top, y2 * sy - g.top], 0, min(g.crop, g.height - g.top))
        if bx2 - bx1 < 1 or by2 - by1 < 1:
            continue
        if g.flip:
            bx1, bx2 = g.crop - bx2, g.crop - bx1
        kept.append((label, bx1, by1, bx2, by2))
    kept.sort(key=lambda b: -(b[3] - b[1]) * (b[4] - b[2]))
    for i, box in enumerate(kept[:max_boxes]):
        out[i] = box
    return out


def random_scale_crop_flip(
    image: np.ndarray,
    label: np.ndarray | None,
    crop_size: int,
    scale_range: tuple[float, float],
    flip: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random scale in ``scale_range``, pad to at least ``crop_size``, random crop, random flip."""
    geometry = random_geometry(image.shape[:2], crop_size, scale_range, flip, rng)
    image = apply_geometry(image, geometry, 0, Image.BILINEAR)
    return image, None if label is None else apply_geometry(label, geometry)

