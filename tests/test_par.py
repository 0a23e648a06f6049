"""PAR (pixel-adaptive refinement, AFA / ToCo / KTSE) on hand-made images and scores: the kernel weights and one
or two iterations worked out here per pixel in plain Python (AFA's formula written out, never the implementation),
and PAR as the pseudo_labels stage's alternative to DenseCRF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_ray.core.config_base import ParConfig, key_dump
from wsss_ray.maths.par import dilated_neighbours, par_affinity, par_at_scale, par_refine, refine_cams_par
from wsss_ray.methods.cam.config import ImageCamGeneratorConfig
from wsss_ray.methods.registry import build_generator

# Neighbour offsets (dy, dx) at dilation 1, in AFA's kernel order.
OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
ONE_STEP = ParConfig(iterations=1, dilations=[1], downscale=1)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def unbiased_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def position_softmax(temperature: float = 0.3) -> list[float]:
    """Softmax over the 8 dilation-1 neighbours of −(distance / (σ + 1e−8) / w1)², distances 1 or √2."""
    distances = [math.hypot(dy, dx) for dy, dx in OFFSETS]
    spread = unbiased_std(distances)
    return softmax([-((d / (spread + 1e-8) / temperature) ** 2) for d in distances])


def clamp(value: int, size: int) -> int:
    return min(max(value, 0), size - 1)


# An edge image (1, 3, 4, 4): columns 0-1 dark, columns 2-3 bright, with some texture (so that σ of the
# neighbours' colours differs from σ of their differences to the centre); every channel a scaled copy (1, 2,
# 0.5), which PAR's per-channel σ cancels, so each channel gives the same colour kernel.
EDGE = [[0.0, 0.2, 1.0, 1.0], [0.0, 0.3, 0.9, 1.0], [0.1, 0.2, 1.0, 0.8], [0.0, 0.0, 1.0, 1.0]]


def edge_image() -> torch.Tensor:
    plane = torch.tensor(EDGE)
    return torch.stack([plane, 2 * plane, 0.5 * plane])[None]


def hand_affinity(image: list[list[float]], y: int, x: int, w1: float = 0.3, w2: float = 0.01) -> list[float]:
    """AFA's affinity of pixel (y, x) with its 8 dilation-1 neighbours (replicated border), one grey channel."""
    h, w = len(image), len(image[0])
    neighbours = [image[clamp(y + dy, h)][clamp(x + dx, w)] for dy, dx in OFFSETS]
    spread = unbiased_std(neighbours)
    colour = softmax([-((abs(n - image[y][x]) / (spread + 1e-8) / w1) ** 2) for n in neighbours])
    return [c + w2 * p for c, p in zip(colour, position_softmax(w1), strict=True)]


def test_neighbours_follow_afa_order_with_a_replicated_border() -> None:
    x = torch.arange(9.0).view(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    neighbours = dilated_neighbours(x, [1, 2])
    assert neighbours.shape == (1, 1, 16, 3, 3)
    # Centre (1, 1), dilation 1: the 8 around it in row-major order.
    assert neighbours[0, 0, :8, 1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    # Corner (0, 0), dilation 1: above/left fall outside and repeat the border: (−1,−1)→(0,0), (−1,0)→(0,0),
    # (−1,1)→(0,1), (0,−1)→(0,0), (0,1), (1,−1)→(1,0), (1,0), (1,1).
    assert neighbours[0, 0, :8, 0, 0].tolist() == [0, 0, 1, 0, 1, 3, 3, 4]
    # Centre, dilation 2: every offset ±2 leaves the 3x3 map and clamps to its corners and edges.
    assert neighbours[0, 0, 8:, 1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


def test_affinity_by_hand_across_an_edge() -> None:
    affinity = par_affinity(edge_image(), ONE_STEP)
    assert affinity.shape == (1, 1, 8, 4, 4)
    # Pixel (1, 1) (0.3) is dark; its neighbours (0,2), (1,2), (2,2) are bright: σ of the 8 neighbour colours
    # [0, 0.2, 1, 0, 0.9, 0.1, 0.2, 1] ≈ 0.44, so a bright neighbour's kernel is about −(0.65/0.44/0.3)² ≈ −24
    # and gets almost nothing of the colour softmax; the dark ones share it, plus 0.01 × the position softmax.
    expected = hand_affinity(EDGE, 1, 1)
    assert affinity[0, 0, :, 1, 1].tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[2] < 1e-6 < expected[1]
    # Border pixel (0, 3): the replicated border makes (−1, ·) repeat row 0.
    assert affinity[0, 0, :, 0, 3].tolist() == pytest.approx(hand_affinity(EDGE, 0, 3), abs=1e-6)
    # Shifting and scaling the colours (an ImageNet-normalised image, 0-255 RGB) gives the same affinity.
    assert torch.allclose(par_affinity(edge_image() * 255 + 10, ONE_STEP), affinity, atol=1e-6)


def test_one_iteration_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.7, 0.6, 0.2, 0.1], [0.5, 0.4, 0.3, 0.2], [0.3, 0.2, 0.1, 0.0]])
    refined = par_refine(edge_image(), scores[None, None], ONE_STEP)
    for y, x in [(1, 1), (1, 2), (3, 0)]:
        weights = hand_affinity(EDGE, y, x)
        expected = sum(a * scores[clamp(y + dy, 4), clamp(x + dx, 4)].item()
                       for a, (dy, dx) in zip(weights, OFFSETS, strict=True))
        assert refined[0, 0, y, x].item() == pytest.approx(expected, abs=1e-6), (y, x)


def test_two_iterations_on_a_flat_image_by_hand() -> None:
    """A flat image: every colour difference and σ is 0, so the colour kernel is 0 and its softmax 1/8 for every
    neighbour; the affinity is the same everywhere, a_k = 1/8 + 0.01·softmax(position)_k."""
    weights = [1 / 8 + 0.01 * p for p in position_softmax()]
    assert sum(weights) == pytest.approx(1.01)
    scores = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]

    def step(s: list[list[float]]) -> list[list[float]]:
        return [[sum(a * s[clamp(y + dy, 3)][clamp(x + dx, 3)] for a, (dy, dx) in zip(weights, OFFSETS, strict=True))
                 for x in range(3)] for y in range(3)]

    expected = step(step(scores))
    refined = par_refine(torch.full((1, 3, 3, 3), 0.4), torch.tensor(scores)[None, None],
                         ParConfig(iterations=2, dilations=[1], downscale=1))
    assert refined[0, 0].tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_position_kernel_spreads_over_every_dilation_by_hand() -> None:
    """Dilations 1 and 2 on a flat image: the colour softmax is 1/16 for each of the 16 neighbours, and the
    position kernel's σ is taken over all 16 distances at once (1 and √2 at dilation 1, 2 and 2√2 at dilation 2),
    so the nearest neighbours get it nearly all."""
    distances = [d * math.hypot(dy, dx) for d in (1, 2) for dy, dx in OFFSETS]
    spread = unbiased_std(distances)
    position = softmax([-((d / (spread + 1e-8) / 0.3) ** 2) for d in distances])
    expected = [1 / 16 + 0.01 * p for p in position]
    affinity = par_affinity(torch.full((1, 3, 5, 5), 0.4), ParConfig(iterations=1, dilations=[1, 2], downscale=1))
    assert affinity[0, 0, :, 2, 2].tolist() == pytest.approx(expected, abs=1e-7)
    # With σ over all 16, the four dilation-1 edge neighbours (distance 1) take almost all of the position mass.
    assert expected[1] == pytest.approx(1 / 16 + 0.01 / 4, abs=1e-6) and max(expected[8:]) < expected[1]


def test_defaults_are_ktse_and_afa() -> None:
    config = ParConfig()
    assert (config.iterations, config.dilations, config.downscale) == (10, [1, 2, 4, 8, 12, 24], 2)
    assert (config.temperature, config.position_weight) == (0.3, 0.01)


def test_par_at_scale_runs_at_half_resolution_and_returns_full_size() -> None:
    torch.manual_seed(0)
    image, probs = torch.rand(2, 3, 9, 6), torch.rand(2, 4, 9, 6)
    out = par_at_scale(image, probs, ParConfig())
    assert out.shape == (2, 4, 9, 6)
    # The same as resizing to 4x3 by hand, refining there, and resizing back.
    small = torch.nn.functional.interpolate(image, size=(4, 3), mode="bilinear", align_corners=False)
    small_probs = torch.nn.functional.interpolate(probs, size=(4, 3), mode="bilinear", align_corners=False)
    back = torch.nn.functional.interpolate(par_refine(small, small_probs, ParConfig()), size=(9, 6),
                                           mode="bilinear", align_corners=False)
    assert torch.allclose(out, back, atol=1e-6)


def test_par_at_scale_on_a_flat_image_by_hand() -> None:
    """4x4 scores on a flat image, downscale 2: bilinear 4x4 → 2x2 averages each 2x2 block; one PAR step on the
    2x2 map mixes each cell with its 8 replicated neighbours by a_k = 1/8 + 0.01·softmax(position)_k; bilinear
    2x2 → 4x4 (align_corners=False) gives rows and columns s0, (3s0 + s1)/4, (s0 + 3s1)/4, s1."""
    scores = [[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]]
    small = [[4.0, 0.0], [0.0, 2.0]]  # the block means
    weights = [1 / 8 + 0.01 * p for p in position_softmax()]
    refined = [[sum(a * small[clamp(y + dy, 2)][clamp(x + dx, 2)] for a, (dy, dx) in zip(weights, OFFSETS, strict=True))
                for x in range(2)] for y in range(2)]

    def up(a: float, b: float) -> list[float]:
        return [a, (3 * a + b) / 4, (a + 3 * b) / 4, b]

    columns = [up(row[0], row[1]) for row in refined]  # each of the 2 rows widened to 4
    expected = [list(row) for row in zip(*[up(columns[0][x], columns[1][x]) for x in range(4)], strict=True)]
    out = par_at_scale(torch.full((1, 3, 4, 4), 0.4), torch.tensor(scores)[None, None],
                       ParConfig(iterations=1, dilations=[1], downscale=2))
    assert out[0, 0].tolist() == [pytest.approx(row, abs=1e-5) for row in expected]


def _two_region_image() -> tuple[np.ndarray, np.ndarray]:
    """16x16: left half dark, right half bright; the class's CAM is 1 on the right half."""
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 200
    cams = np.zeros((1, 16, 16), np.float32)
    cams[0, :, 8:] = 1.0
    return image, cams


def test_refine_cams_par_labels_and_confidence() -> None:
    image, cams = _two_region_image()
    mask = refine_cams_par(image, cams, [5], ParConfig(), bg_score=0.15)
    assert mask.dtype == np.uint8 and mask.shape == (16, 16)
    assert (mask[:, :6] == 0).all() and (mask[:, 10:] == 5).all()
    # Shares after renormalising: the right half 1/1.15 ≈ 0.87 for class 5, the left half 1 for background.
    sure = refine_cams_par(image, cams, [5], ParConfig(), bg_score=0.15, confidence=0.95)
    assert (sure[:, 10:] == 255).all() and (sure[:, :6] == 0).all()
    assert (refine_cams_par(image, np.zeros((0, 16, 16), np.float32), [], ParConfig(), 0.15) == 0).all()
    with pytest.raises(ValueError, match="cams"):
        refine_cams_par(image, cams, [5, 6], ParConfig(), 0.15)


def test_pseudo_labels_can_refine_with_par_and_keep_crf_as_default() -> None:
    default = ImageCamGeneratorConfig()
    assert default.refine == "crf"
    # A field added at the value that reproduces the earlier outputs stays out of the stage key.
    assert "refine" not in key_dump(default) and "par" not in key_dump(default)
    par = ImageCamGeneratorConfig(refine="par", par={"iterations": 5})
    assert key_dump(par)["refine"] == "par" and key_dump(par)["par"]["iterations"] == 5
    image, cams = _two_region_image()
    maps = build_generator(par).refine_step(image, {"cams": cams}, {}, [5])
    assert np.array_equal(maps["pseudo"], refine_cams_par(image, cams, [5], par.par, par.bg_score))
