"""Crop geometry: one random scale-pad-crop-flip replayed on every map of an image, and inverted for OuT."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsss_ray.data.transforms import (
    CropGeometry,
    apply_geometry,
    random_geometry,
    random_scale_crop_flip,
    scatter_back,
    transform_boxes,
)


def test_apply_geometry_pads_crops_and_flips_by_hand() -> None:
    label = np.arange(6, dtype=np.uint8).reshape(2, 3)  # [[0 1 2] [3 4 5]]
    g = CropGeometry(height=2, width=3, top=0, left=0, crop=3, flip=False)  # one padded row at the bottom
    expected = np.array([[0, 1, 2], [3, 4, 5], [255, 255, 255]], np.uint8)
    assert np.array_equal(apply_geometry(label, g), expected)
    flipped = apply_geometry(label, CropGeometry(2, 3, 0, 0, 3, True))
    assert np.array_equal(flipped, expected[:, ::-1])
    assert np.array_equal(CropGeometry(2, 3, 0, 0, 3, True).valid(), expected[:, ::-1] != 255)
    # Pad value is per map: a distance map pads with 0.
    assert apply_geometry(label, g, pad_value=0)[2, 2] == 0
    # Scale 2 (nearest for label maps), crop the bottom-right 2x2 of the 4x6 map.
    assert np.array_equal(apply_geometry(label, CropGeometry(4, 6, 2, 4, 2, False)), [[5, 5], [5, 5]])


def test_geometry_round_trips_through_a_batch_array() -> None:
    g = CropGeometry(10, 12, 3, 4, 8, True)
    assert CropGeometry.from_array(g.as_array()) == g


def test_scatter_back_inverts_the_crop_for_every_random_geometry() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(5, 40, 2))
        g = random_geometry((h, w), 16, (0.5, 2.0), True, rng)
        full = rng.integers(0, 5, (h, w)).astype(np.uint8)
        crop = apply_geometry(full, g)
        assert np.array_equal(scatter_back(full, crop, g), full)  # an unchanged crop changes nothing
        corrected = np.where(g.valid(), crop + 10, 255).astype(np.uint8)
        back = scatter_back(full, corrected, g)
        # Cropping the updated map again gives exactly the corrected crop (padding aside)...
        assert np.array_equal(apply_geometry(back, g)[g.valid()], corrected[g.valid()])
        # ... and pixels outside the crop keep their old labels.
        assert set(np.unique(back[back < 10])) <= set(np.unique(full))


def test_image_and_label_share_one_geometry() -> None:
    rng = np.random.default_rng(3)
    image = np.zeros((40, 30, 3), np.uint8)
    image[:, 15:] = 200  # right half bright
    label = np.zeros((40, 30), np.uint8)
    label[:, 15:] = 1
    for _ in range(20):
        crop, crop_label = random_scale_crop_flip(image, label, 24, (0.7, 1.3), True, rng)
        inside = crop_label != 255
        # Bilinear image vs nearest label differ only on the one-pixel seam between the halves.
        agree = (crop[..., 0][inside] > 100) == (crop_label[inside] == 1)
        assert agree.mean() > 0.9


def test_transform_boxes_scales_crops_flips_and_pads() -> None:
    boxes = np.array([[3, 10, 10, 30, 20], [5, 0, 0, 4, 4]])
    g = CropGeometry(height=80, width=80, top=10, left=10, crop=32, flip=False)  # scale 2 of a 40x40 image
    out = transform_boxes(boxes, g, (40, 40), max_boxes=4)
    # Box 1: x 20..60 → 10..50 clipped to 32; y 20..40 → 10..30. Box 2: 0..8 → -10..-2 → cropped away.
    assert np.allclose(out[0], [3, 10, 10, 32, 30])
    assert np.all(out[1:, 0] == -1)
    flipped = transform_boxes(boxes, CropGeometry(80, 80, 10, 10, 32, True), (40, 40), max_boxes=4)
    assert np.allclose(flipped[0], [3, 0, 10, 22, 30])


def test_pil_nearest_is_what_the_inverse_assumes() -> None:
    # scatter_back asks PIL for its nearest-neighbour sources; a label upscaled 3x must map back exactly.
    label = np.array([[1, 2], [3, 4]], np.uint8)
    big = np.asarray(Image.fromarray(label).resize((6, 6), Image.NEAREST))
    g = CropGeometry(6, 6, 0, 0, 6, False)
    assert np.array_equal(apply_geometry(label, g), big)
    assert np.array_equal(scatter_back(np.zeros_like(label), big, g), label)


@pytest.mark.parametrize("crop", [8, 64])
def test_random_geometry_stays_inside_the_padded_image(crop: int) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        g = random_geometry((30, 50), crop, (0.5, 1.5), True, rng)
        assert 0 <= g.top <= max(g.height, crop) - crop and 0 <= g.left <= max(g.width, crop) - crop
