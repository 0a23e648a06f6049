"""The pseudo-label generators' maths (MSPN vote, BANA attention / retrieval, CDSP distances) and their configs.

Pure functions on hand-made arrays, no Ray; one test runs each generator's two steps on a random classifier.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from wsss_ray.methods.bana.boxes import (
    background_attention,
    box_constrained_argmax,
    box_fill,
    box_unaries,
    boxes_array,
    cell_centres_in_boxes,
    prototypes,
    retrieve,
)
from wsss_ray.methods.bana.config import BoxGeneratorConfig
from wsss_ray.methods.cam.config import ImageCamGeneratorConfig
from wsss_ray.methods.cdsp.config import ScribbleGeneratorConfig
from wsss_ray.methods.cdsp.distance import (
    apply_scribbles,
    boundary_distance,
    boundary_mask,
    foreground_contour,
    scribble_distance,
    to_uint8,
)
from wsss_ray.methods.mspn.config import MultiSeedGeneratorConfig
from wsss_ray.methods.mspn.seeds import clean_mask, dropout_cams, seed_value, vote
from wsss_ray.methods.registry import GENERATORS, build_classifier, build_generator
from wsss_ray.pipeline_config import ClassifierTrainConfig, ConfigError, parse_config

# --------------------------------------------------------------------------------------------- MSPN


def test_vote_majority_agreement_and_clean_mask() -> None:
    # Three seeds over a 2x3 image, worked out by hand per pixel.
    maps = np.array([
        [[1, 1, 0], [2, 255, 0]],
        [[1, 2, 0], [2, 255, 1]],
        [[1, 2, 3], [0, 255, 2]],
    ], np.uint8)
    majority, agreement = vote(maps)
    # (0,0): 1,1,1 → 1 x3 | (0,1): 1,2,2 → 2 x2 | (0,2): 0,0,3 → 0 x2
    # (1,0): 2,2,0 → 2 x2 | (1,1): all abstain → 255 x0 | (1,2): 0,1,2 → tie, smallest label 0 x1
    assert majority.tolist() == [[1, 2, 0], [2, 255, 0]]
    assert agreement.tolist() == [[3, 2, 2], [2, 0, 1]]
    assert majority.dtype == np.uint8 and agreement.dtype == np.uint8
    assert clean_mask(majority, agreement, 2).tolist() == [[1, 2, 0], [2, 255, 255]]
    assert clean_mask(majority, agreement, 3).tolist() == [[1, 255, 255], [255, 255, 255]]
    with pytest.raises(ValueError):
        clean_mask(majority, agreement, 0)


def test_seed_values_are_stable_and_distinct() -> None:
    # crc32, not hash(): the same in every process (hash() of a str is salted per interpreter).
    assert seed_value("2007_000032", 0) == seed_value("2007_000032", 0)
    assert len({seed_value("2007_000032", i) for i in range(6)}) == 6


def _model(num_fg: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ClassifierTrainConfig.model_validate({"backbone": {"name": "resnet_tiny", "output_stride": 16}})
    return build_classifier(config, num_fg).eval()


def test_dropout_cams_are_deterministic_per_seed() -> None:
    model = _model()
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    a = dropout_cams(model, image, [1, 3], 0.3, 1.2, True, seed=7)
    b = dropout_cams(model, image, [1, 3], 0.3, 1.2, True, seed=7)
    c = dropout_cams(model, image, [1, 3], 0.3, 1.2, True, seed=8)
    assert a.shape == (2, 40, 48) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0 + 1e-6
    torch.manual_seed(1)
    state = torch.get_rng_state()
    dropout_cams(model, image, [2], 0.1, 1.0, False, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


# --------------------------------------------------------------------------------------------- BANA


def test_background_attention_on_hand_made_features() -> None:
    # 4x4 feature map, 2 channels: background cells point along e0, the box's cells along e1 (orthogonal).
    features = np.zeros((2, 4, 4), np.float32)
    features[0] = 2.0
    features[:, 1:3, 1:3] = np.array([0.0, 5.0])[:, None, None]
    # A 64x64 image at stride 16: the box covers pixels 16..47 = feature cells 1..2.
    boxes = boxes_array([[1, 16, 16, 48, 48]])
    inside = cell_centres_in_boxes(boxes, (4, 4), (64, 64))
    assert inside.sum() == 4 and inside[1:3, 1:3].all()
    attention = background_attention(features, ~inside, grid=1)
    assert np.allclose(attention[~inside], 1.0) and np.allclose(attention[inside], 0.0)
    # Grid 2: every grid cell has background, every query is e0 → the same map.
    assert np.allclose(background_attention(features, ~inside, grid=2), attention)
    # No background cell at all: no query, A = 0.
    assert np.allclose(background_attention(features, np.zeros((4, 4), bool)), 0.0)


def test_box_centre_rule_and_manifest_shapes() -> None:
    # A box covering pixels 0..7 holds the centre (8) of no stride-16 cell; 0..8 does.
    assert not cell_centres_in_boxes(boxes_array([[1, 0, 0, 8, 8]]), (2, 2), (32, 32)).any()
    assert cell_centres_in_boxes(boxes_array([[1, 0, 0, 9, 9]]), (2, 2), (32, 32)).sum() == 1
    # Ray Data hands list columns over as numpy arrays (of arrays).
    ragged = np.array([np.array([2, 1, 2, 3, 4]), np.array([1, 0, 0, 5, 5])], dtype=object)
    assert boxes_array(ragged).tolist() == [[2, 1, 2, 3, 4], [1, 0, 0, 5, 5]]
    assert boxes_array(None).shape == (0, 5) and boxes_array([]).shape == (0, 5)


def test_box_fill_puts_smaller_boxes_on_top() -> None:
    boxes = [[2, 2, 2, 4, 4], [1, 0, 0, 6, 6]]  # the small box comes first in the list
    mask = box_fill(boxes_array(boxes), (6, 8))
    expected = np.zeros((6, 8), np.uint8)
    expected[0:6, 0:6] = 1
    expected[2:4, 2:4] = 2
    assert np.array_equal(mask, expected)


def _box_case() -> tuple[np.ndarray, np.ndarray]:
    """4×6 image, one class-3 box over rows 1-2, cols 1-2; raw attention at every pixel (spec issue 14, 3.4)."""
    cams = np.zeros((1, 4, 6), np.float32)
    cams[0, 1:3, 1:3] = [[0.2, 0.4], [0.1, 0.0]]
    cams[0, 0, 5] = 1.0  # outside the box: must not count in the max, nor appear in u_c
    attention = np.full((4, 6), 0.5, np.float32)
    attention[0, 0] = 0.8  # outside the box: sets max A, so τ = 0.99 · 0.8 = 0.792
    attention[2, 1] = 0.795  # inside: kept (≥ τ), though an absolute 0.99 would have dropped it
    return cams, attention


def _softmax(*scores: float) -> list[float]:
    exps = [math.exp(v) for v in scores]
    return [e / sum(exps) for e in exps]


def test_box_unaries_follow_bana_stage2() -> None:
    # BANA stage2.py: A < 0.99·max A → 0 inside the boxes, u_c = CAM / max over the box, softmax inside boxes.
    cams, attention = _box_case()
    probs = box_unaries(cams, [3], boxes_array([[3, 1, 1, 3, 3]]), attention, 0.99)
    assert probs.shape == (2, 4, 6) and np.allclose(probs.sum(0), 1.0)
    outside = np.ones((4, 6), bool)
    outside[1:3, 1:3] = False
    assert (probs[0][outside] == 1.0).all() and (probs[1][outside] == 0.0).all()  # (0,5) included
    # (1,1): u_0 = 0 (0.5 < 0.792), u_c = 0.2/0.4 → softmax(0, 0.5) = (0.377541, 0.622459)
    assert probs[:, 1, 1] == pytest.approx(_softmax(0.0, 0.5), abs=1e-6)
    assert probs[0, 1, 1] == pytest.approx(0.377541, abs=1e-6)
    # (1,2): softmax(0, 1) = (0.268941, 0.731059)
    assert probs[0, 1, 2] == pytest.approx(0.268941, abs=1e-6)
    # (2,1): u_0 = 0.795 kept, u_c = 0.25 → (0.632975, 0.367025)
    assert probs[0, 2, 1] == pytest.approx(0.632975, abs=1e-6)
    # (2,2): u_0 = 0, u_c = 0 → (0.5, 0.5); the earlier L1 reading made it certain background
    assert probs[:, 2, 2] == pytest.approx([0.5, 0.5], abs=1e-6)


def test_box_unaries_earlier_reading_is_an_option() -> None:
    # absolute_pin + l1 + per_class: A ≥ 0.99 → 1, scores over their sum (the reading before issue 14).
    cams, attention = _box_case()
    attention[2, 1] = 0.995
    probs = box_unaries(cams, [3], boxes_array([[3, 1, 1, 3, 3]]), attention, 0.99, "absolute_pin", "l1",
                        "per_class")
    assert probs[1, 1, 2] == pytest.approx(1 / 1.5)  # u_c 1, u_0 0.5
    assert probs[1, 2, 1] == pytest.approx(0.25 / 1.25)  # u_0 pinned to 1
    assert probs[0, 2, 2] == pytest.approx(1.0)  # u_c 0 → background certain


def test_box_unaries_softmax_over_all_classes_and_box_mask() -> None:
    # A class-5 box elsewhere: at (1,1) class 5 still takes part in the softmax with 0.
    cams, attention = _box_case()
    cams = np.concatenate([cams, np.zeros((1, 4, 6), np.float32)])
    cams[1, 3, 4] = 0.7
    boxes = boxes_array([[3, 1, 1, 3, 3], [5, 4, 3, 6, 4]])
    probs = box_unaries(cams, [3, 5], boxes, attention, 0.99)
    assert probs[:, 1, 1] == pytest.approx([0.274069, 0.451863, 0.274069], abs=1e-6)
    # (3,4) and (3,5) in the class-5 box: u_5 = 0.7/0.7 = 1 and 0/0.7 = 0, u_0 = 0 (0.5 < τ), u_3 = 0.
    assert probs[:, 3, 4] == pytest.approx(_softmax(0.0, 0.0, 1.0), abs=1e-6)
    # A posterior with class 5 largest at (1,1), outside its box: the box mask (stage2.py) rules it out.
    posterior = np.zeros((3, 4, 6), np.float32)
    posterior[:, 1, 1] = [0.2, 0.3, 0.5]
    posterior[:, 3, 4] = [0.3, 0.6, 0.1]
    inside = np.zeros((2, 4, 6), bool)
    inside[0, 1:3, 1:3] = True
    inside[1, 3, 4:6] = True
    y_crf = box_constrained_argmax(posterior, [3, 5], inside)
    assert y_crf[1, 1] == 3 and y_crf[3, 4] == 0  # class 3 outside its box at (3,4): background wins


def test_box_generator_defaults_are_bana_stage2() -> None:
    config = BoxGeneratorConfig()
    crf = config.crf
    # configs/stage2.yml DCRF [4, 55, 3, 3, 3] = (bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std), 10 iterations
    assert (crf.bilateral_compat, crf.bilateral_sxy, crf.bilateral_srgb) == (4.0, 55.0, 3.0)
    assert (crf.gaussian_compat, crf.gaussian_sxy, crf.iterations) == (3.0, 3.0, 10)
    assert (config.bg_threshold, config.bg_threshold_mode, config.unary, config.cam_norm) == (
        0.99, "relative_zero", "softmax", "per_box")
    assert config.scales == [1.0] and config.flip is False
    # A partial crf section keeps the rest of BANA's set, not the CAM generators' PSA set.
    partial = BoxGeneratorConfig.model_validate({"crf": {"bilateral_sxy": 30}}).crf
    assert (partial.bilateral_sxy, partial.bilateral_srgb, partial.bilateral_compat) == (30.0, 3.0, 4.0)


def test_prototypes_and_retrieval_on_separable_features() -> None:
    # 3 classes on a 2x3 feature map of a 32x48 image: column j holds class j's direction.
    directions = np.eye(3, dtype=np.float32) * 3.0
    features = np.repeat(directions[:, None, :], 2, axis=1)  # (C=3, h=2, w=3)
    label_map = np.repeat(np.repeat(np.array([[0, 1, 2]], np.uint8), 32, axis=0), 16, axis=1)
    protos = prototypes(features, label_map, [0, 1, 2, 5])
    assert sorted(protos) == [0, 1, 2]  # class 5 is absent
    assert np.allclose(protos[1], directions[:, 1])
    # A pixel mislabelled in the label map does not change the feature-level answer.
    noisy = label_map.copy()
    noisy[0:4, 20:24] = 2
    retrieved = retrieve(features, prototypes(features, noisy, [0, 1, 2]), (32, 48))
    assert np.array_equal(retrieved, label_map)
    # The box constraint: class 2 only allowed in the left half → the right column falls back to a class allowed.
    allowed = {2: np.zeros((32, 48), bool)}
    constrained = retrieve(features, protos, (32, 48), allowed)
    assert not (constrained == 2).any() and np.array_equal(constrained[:, :32], label_map[:, :32])
    # A small class (one quarter of a cell) still gets a prototype through area weighting.
    small = np.zeros((32, 48), np.uint8)
    small[0:8, 0:8] = 1
    assert 1 in prototypes(features, small, [0, 1])


# --------------------------------------------------------------------------------------------- CDSP


def test_scribble_distance_at_known_offsets() -> None:
    scribble = np.full((21, 21), 255, np.uint8)
    scribble[10, 10] = 1
    lam = 2.0
    d = scribble_distance(scribble, lam)
    k = math.exp(lam / 2)  # sqrt(e^λ)
    assert d[10, 10] == 1.0
    # q = ⌊k·dist⌋ (the paper's floor), d_s = (255 − q)/255.
    assert d[10, 13] == pytest.approx((255 - math.floor(3 * k)) / 255)
    assert d[13, 14] == pytest.approx((255 - math.floor(5 * k)) / 255)  # a 3-4-5 offset
    assert d[0, 0] == pytest.approx((255 - math.floor(math.hypot(10, 10) * k)) / 255)
    # Far enough away the clip at 255 makes it 0.
    assert scribble_distance(scribble, 12.0)[10, 13] == 0.0
    assert np.all(scribble_distance(np.full((4, 4), 255, np.uint8), lam) == 0.0)  # no scribble at all
    stored = to_uint8(d)
    assert stored[10, 10] == 255 and stored[10, 13] == 255 - math.floor(3 * k)
    # The old reading rounds the scaled distance.
    assert to_uint8(scribble_distance(scribble, lam, quantise="round"))[10, 13] == 255 - round(3 * k)


def _scaled_by_loops(shape: tuple[int, int], sources: list[tuple[int, int]], lam: float) -> np.ndarray:
    """q(p) = min(255, ⌊e^(λ/2)·min_s |p − s|⌋) by brute force over the sources (255 without any)."""
    q = np.full(shape, 255, np.int64)
    for r in range(shape[0]):
        for c in range(shape[1]):
            if sources:
                dist = min(math.hypot(r - sr, c - sc) for sr, sc in sources)
                q[r, c] = min(255, math.floor(math.exp(lam / 2) * dist))
    return q


def test_scribble_distance_foreground_only() -> None:
    # Spec 6.4: the class-0 stroke at index 1 is not a source; only the class-3 stroke at index 4 is.
    scribble = np.array([[255, 0, 255, 255, 3, 255, 255]], np.uint8)
    expected = 255 - _scaled_by_loops((1, 7), [(0, 4)], 2.0)
    assert expected.tolist() == [[245, 247, 250, 253, 255, 253, 250]]
    assert to_uint8(scribble_distance(scribble, 2.0)).tolist() == expected.tolist()
    # Old reading (every stroke a source, rounded): [252, 255, 252, 252, 255, 252, 250].
    old = to_uint8(scribble_distance(scribble, 2.0, sources="all", quantise="round"))
    assert old.tolist() == [[252, 255, 252, 252, 255, 252, 250]]
    # Only background strokes: no source, d_s = 0 everywhere.
    assert np.all(scribble_distance(np.array([[0, 255, 0]], np.uint8), 2.0) == 0.0)


def _contour_by_loops(label_map: np.ndarray) -> list[tuple[int, int]]:
    """Foreground (∉ {0, 255}) pixels with a 4-neighbour that is background, 255 or outside the image."""
    h, w = label_map.shape

    def fg(r: int, c: int) -> bool:
        return 0 <= r < h and 0 <= c < w and int(label_map[r, c]) not in (0, 255)

    return [(r, c) for r in range(h) for c in range(w)
            if fg(r, c) and not all(fg(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))]


def test_boundary_distance_foreground_contour() -> None:
    # Spec 6.4: classes 1 and 2 side by side form one foreground block; the class 1|2 edge is not a boundary.
    omega = np.zeros((5, 6), np.uint8)
    omega[1:4, 1:3] = 1
    omega[1:4, 3:5] = 2
    expected = _scaled_by_loops((5, 6), _contour_by_loops(omega), 2.0)
    assert expected.tolist() == [[3, 2, 2, 2, 2, 3], [2, 0, 0, 0, 0, 2], [2, 0, 2, 2, 0, 2], [2, 0, 0, 0, 0, 2],
                                 [3, 2, 2, 2, 2, 3]]
    assert to_uint8(boundary_distance(omega, 2.0)).tolist() == expected.tolist()
    # Old reading: every label change (the 1|2 edge and the ring around the block) is boundary.
    old = to_uint8(boundary_distance(omega, 2.0, boundary="label_edges"))
    assert old[2, 2] == 0 and old[0, 2] == 0 and old[2, 0] == 0
    # A 255 pixel inside the block is background: its 4-neighbours join the contour.
    holed = omega.copy()
    holed[2, 2] = 255
    contour = _contour_by_loops(holed)
    assert {(1, 2), (2, 1), (2, 3), (3, 2)} <= set(contour)
    assert to_uint8(boundary_distance(holed, 2.0)).tolist() == _scaled_by_loops((5, 6), contour, 2.0).tolist()
    # Foreground touching the image edge has its edge pixels on the contour; no foreground: d_c = 1.
    edge = np.ones((3, 3), np.uint8)
    assert foreground_contour(edge).tolist() == [[True, True, True], [True, False, True], [True, True, True]]
    assert np.all(boundary_distance(np.zeros((4, 4), np.uint8), 2.0) == 1.0)


def test_boundary_detection_and_distance() -> None:
    # The old reading, kept as boundary="label_edges" (values now floored).
    labels = np.zeros((8, 10), np.uint8)
    labels[:, 5:] = 2
    edge = boundary_mask(labels)
    assert edge[:, 4].all() and edge[:, 5].all() and edge.sum() == 16  # both sides of the edge, 4-neighbours
    diagonal = np.zeros((3, 3), np.uint8)
    diagonal[1, 1] = 1
    assert boundary_mask(diagonal).tolist() == [[False, True, False], [True, True, True], [False, True, False]]
    lam = 2.0
    k = math.exp(lam / 2)
    d = boundary_distance(labels, lam, boundary="label_edges")
    assert d[3, 4] == 0.0 and d[3, 2] == pytest.approx(math.floor(2 * k) / 255)
    assert d[3, 9] == pytest.approx(math.floor(4 * k) / 255)
    assert np.all(boundary_distance(np.ones((4, 4), np.uint8), lam, boundary="label_edges") == 1.0)  # no boundary
    assert boundary_distance(labels, 7.0, boundary="label_edges")[3, 0] == pytest.approx(
        min(math.floor(4 * math.exp(3.5)), 255) / 255)


def test_scribbles_override_the_pseudo_label() -> None:
    pseudo = np.zeros((3, 3), np.uint8)
    scribble = np.full((3, 3), 255, np.uint8)
    scribble[1, :] = [4, 0, 4]
    pseudo[1, 1] = 4
    assert apply_scribbles(pseudo, scribble).tolist() == [[0, 0, 0], [4, 0, 4], [0, 0, 0]]
    with pytest.raises(ValueError):
        apply_scribbles(pseudo, scribble[:2])


# --------------------------------------------------------------------------------------------- configs


def _pipeline(generator: dict[str, Any]) -> Any:
    supervision = {"scribble": "scribbles", "box": "boxes"}.get(generator.get("name", ""), "tags")
    return parse_config({"output": "out", "dataset": {"root": "data", "supervision": supervision},
                         "pseudo_labels": {"generator": generator}}, source="cfg.yaml")


def test_generator_configs_validate_with_paper_defaults() -> None:
    assert isinstance(_pipeline({"scales": [1.0]}).pseudo_labels.generator, ImageCamGeneratorConfig)  # no name
    multi = _pipeline({"name": "multi_seed"}).pseudo_labels.generator
    assert isinstance(multi, MultiSeedGeneratorConfig)
    assert multi.seeds == [(0.05, 1.0), (0.05, 1.2), (0.10, 1.0), (0.10, 1.2), (0.20, 1.0), (0.30, 1.2)]
    assert multi.agreement == 4
    box = _pipeline({"name": "box"}).pseudo_labels.generator
    assert isinstance(box, BoxGeneratorConfig) and box.grid == 1 and box.bg_threshold == 0.99
    scribble = _pipeline({"name": "scribble", "lambda_s": 1, "lambda_c": 6}).pseudo_labels.generator
    assert isinstance(scribble, ScribbleGeneratorConfig) and (scribble.lambda_s, scribble.lambda_c) == (1, 6)
    assert ScribbleGeneratorConfig().lambda_s == 2.0 and ScribbleGeneratorConfig().lambda_c == 7.0
    assert set(GENERATORS) == {"image_cam", "multi_seed", "box", "scribble"}
    with pytest.raises(ConfigError, match="generator 'scribble' needs dataset.supervision scribbles"):
        parse_config({"output": "out", "dataset": {"root": "data"}, "pseudo_labels": {"generator": {
            "name": "scribble"}}})
    for config in (multi, box, scribble):
        assert build_generator(config).describe()["name"] == config.name


@pytest.mark.parametrize(("generator", "field"), [
    ({"name": "multi_seed", "agreement": 7}, "pseudo_labels.generator.agreement"),
    ({"name": "multi_seed", "seeds": [[0.1, 1.0], [0.2, 1.0]], "agreement": 3},
     "pseudo_labels.generator.agreement"),
    ({"name": "multi_seed", "seeds": [[1.5, 1.0]]}, "pseudo_labels.generator.seeds"),
    ({"name": "box", "grid": 0}, "pseudo_labels.generator.grid"),
    ({"name": "box", "bg_threshold": 1.5}, "pseudo_labels.generator.bg_threshold"),
    ({"name": "scribble", "colour": 1}, "pseudo_labels.generator.colour"),
    ({"name": "grabcut"}, "pseudo_labels.generator.name"),
])
def test_bad_generator_configs_name_the_field(generator: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as error:
        _pipeline(generator)
    assert f"cfg.yaml: {field}" in str(error.value)
    if generator["name"] == "grabcut":
        assert "'grabcut'" in str(error.value) and "'multi_seed'" in str(error.value)


# --------------------------------------------------------------------------------------------- components


def test_each_generator_runs_both_steps_on_a_random_classifier(tmp_path: Any) -> None:
    from wsss_ray.data.image_io import encode_label_png

    model = _model()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    scribble = np.full((48, 64), 255, np.uint8)
    scribble[20, 10:30] = 2
    scribble[2, 2:10] = 0
    (tmp_path / "s.png").write_bytes(encode_label_png(scribble))
    record = {"image_id": "x", "image_uri": "x.jpg", "scribble_uri": str(tmp_path / "s.png"),
              "boxes": np.array([np.array([2, 5, 5, 40, 30]), np.array([3, 30, 10, 60, 45])], dtype=object)}
    crf = {"iterations": 2}
    cases = [(MultiSeedGeneratorConfig(seeds=[(0.1, 1.0), (0.2, 1.2), (0.0, 1.0)], agreement=2, crf=crf), [2, 3]),
             (BoxGeneratorConfig(scales=[1.0], crf=crf), [2, 3]),
             (ScribbleGeneratorConfig(scales=[1.0], crf=crf), [2])]
    for config, labels in cases:
        gen = build_generator(config)
        arrays = gen.model_step(model, image, record, labels, "cpu")
        # what the stage does between the steps
        arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
        maps = gen.refine_step(image, arrays, record, labels)
        assert set(maps) == set(gen.outputs) and set(gen.labels) <= set(gen.outputs)
        for name, m in maps.items():
            assert m.shape == (48, 64) and m.dtype == np.uint8, (config.name, name)
        for name in gen.labels:
            assert set(np.unique(maps[name])) <= {0, 255, *labels}, (config.name, name)
    assert maps["pseudo"][20, 15] == 2 and maps["pseudo"][2, 5] == 0  # scribbles win


def test_scribble_generator_distances_use_fg_strokes_and_the_cam_mask(tmp_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # d_s from the class-2 stroke only (the class-0 stroke is no source); d_c on the CAM mask Ω̃ *before* the
    # scribbles are pasted (the authors' code), so a stroke pasted on a background-only Ω̃ adds no contour.
    from wsss_ray.data.image_io import encode_label_png
    from wsss_ray.methods.cdsp import generator as cdsp_generator

    scribble = np.full((12, 16), 255, np.uint8)
    scribble[6, 2:6] = 2
    scribble[1, 10:14] = 0
    (tmp_path / "s.png").write_bytes(encode_label_png(scribble))
    record = {"image_id": "x", "image_uri": "x.jpg", "scribble_uri": str(tmp_path / "s.png")}
    omega = np.zeros((12, 16), np.uint8)  # the CAM pseudo-label Ω̃: background only
    monkeypatch.setattr(cdsp_generator, "refine_cam_mask", lambda *args, **kwargs: omega.copy())
    image = np.zeros((12, 16, 3), np.uint8)
    arrays = {"cams": np.zeros((1, 12, 16), np.float32)}
    maps = build_generator(ScribbleGeneratorConfig(scales=[1.0])).refine_step(image, arrays, record, [2])
    expected_ds = 255 - _scaled_by_loops((12, 16), [(6, c) for c in range(2, 6)], 2.0)
    assert maps["dist_scribble"].tolist() == expected_ds.tolist()
    assert maps["dist_scribble"][1, 12] < 255  # the background stroke is not a source
    assert np.all(maps["dist_boundary"] == 255)  # Ω̃ has no foreground, hence no contour: d_c = 1
    assert maps["pseudo"][6, 3] == 2
    final = build_generator(ScribbleGeneratorConfig(scales=[1.0], boundary_source="final"))
    assert final.refine_step(image, arrays, record, [2])["dist_boundary"][6, 3] == 0  # old: on the pasted mask
