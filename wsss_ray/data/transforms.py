"""Training-time augmentation and input normalisation, as pure numpy/torch functions.

Augmentation follows torchvision's segmentation reference and the papers: random scale, pad-and-crop to a
fixed square, random horizontal flip. The image is padded with zeros (mean colour after normalisation would be
nicer, but zeros match the reference) and the label with 255 so padding never counts as background.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from wsss_ray.data.classes import IGNORE_LABEL

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def random_scale_crop_flip(
    image: np.ndarray,
    label: np.ndarray | None,
    crop_size: int,
    scale_range: tuple[float, float],
    flip: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random scale in ``scale_range``, pad to at least ``crop_size``, random crop, random flip."""
    image, label = resize(image, label, float(rng.uniform(*scale_range)))
    h, w = image.shape[:2]
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_LABEL)
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - crop_size + 1)), int(rng.integers(0, w - crop_size + 1))
    image = image[top:top + crop_size, left:left + crop_size]
    if label is not None:
        label = label[top:top + crop_size, left:left + crop_size]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 (as stored by Ray Data) → float N×3×H×W with ImageNet mean/std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
