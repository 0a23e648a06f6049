"""BANA's BAP head and objective: hand-made 2-channel 4x4 feature maps, expected values worked out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from wsss_ray.core.config_base import BackboneConfig
from wsss_ray.methods.bana.boxes import background_attention, cell_centres_in_boxes
from wsss_ray.methods.bana.config import BapHeadConfig, BapLossConfig
from wsss_ray.methods.bana.head import BapHead, cosine_logits
from wsss_ray.methods.bana.objective import BapObjective
from wsss_ray.methods.registry import build_classifier
from wsss_ray.pipeline_config import ClassifierTrainConfig

R2 = math.sqrt(2.0)
IMAGE = (8, 8)  # 8x8 image, 4x4 features: cell centres at pixels 1, 3, 5, 7
BOX = [1.0, 2.0, 2.0, 6.0, 6.0]  # class 1; holds the centres 3 and 5 -> rows 1-2, cols 1-2
PAD = [-1.0, 0.0, 0.0, 8.0, 8.0]


def hand_features() -> torch.Tensor:
    """(1, 2, 4, 4). Per 2x2 quadrant: three background cells and one box cell.

    queries (grid 2): TL mean (1,0); TR mean of (0,2),(2,0),(1,1) = (1,1); BL mean of (1,0),(3,0),(2,0) = (2,0);
    BR (0,1). Box cells: (1,1) = (3,4), (1,2) = (-1,0), (2,1) = (0,2), (2,2) = (1,-1).
    """
    cells = {
        (0, 0): (1, 0), (0, 1): (1, 0), (1, 0): (1, 0), (1, 1): (3, 4),
        (0, 2): (0, 2), (0, 3): (2, 0), (1, 3): (1, 1), (1, 2): (-1, 0),
        (2, 0): (1, 0), (3, 0): (3, 0), (3, 1): (2, 0), (2, 1): (0, 2),
        (2, 3): (0, 1), (3, 2): (0, 1), (3, 3): (0, 1), (2, 2): (1, -1),
    }
    f = torch.zeros(1, 2, 4, 4)
    for (i, j), v in cells.items():
        f[0, :, i, j] = torch.tensor(v, dtype=torch.float32)
    return f


# A at the box cells by hand: mean over the 4 queries of ReLU(cos).
A_11 = (0.6 + 1.4 / R2 + 0.6 + 0.8) / 4  # (3,4)/5 against (1,0), (1,1)/√2, (1,0), (0,1)
A_12 = 0.0  # (-1,0): cosines -1, -1/√2, -1, 0
A_21 = (0 + 1 / R2 + 0 + 1) / 4  # (0,1)
A_22 = (1 / R2 + 0 + 1 / R2 + 0) / 4  # (1,-1)/√2: 1/√2, 0, 1/√2, -1/√2 -> 0


def hand_head(scale: float = 2.0, grid: int = 2, classifier: str = "cosine") -> BapHead:
    """Two foreground classes; w_0 = (1,0) background, w_1 = (0,1), w_2 = (-1,0). Cosine (our earlier reading)
    unless told: the BAP maths does not depend on the classifier, and the cosine cases were worked out first."""
    head = BapHead(2, 2, BapHeadConfig(grid=grid, scale=scale, classifier=classifier))
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return head


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


class PoolBackbone(nn.Module):
    """A stride-2 "backbone" (2x2 average pooling), so a test can hand-make the features via ``as_image``."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images, 2)


def as_image(features: torch.Tensor) -> torch.Tensor:
    """The 8x8 "image" whose 2x2 average pooling is ``features`` (each cell repeated 2x2)."""
    return features.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


class Model(nn.Module):
    def __init__(self, head: BapHead) -> None:
        super().__init__()
        self.backbone = PoolBackbone()
        self.head = head


def test_background_mask_is_the_ring_around_the_box() -> None:
    boxes = torch.tensor([[BOX, PAD]])  # the padding row (class -1) covers everything but must be skipped
    mask = BapHead.background_mask(boxes, (4, 4), IMAGE)
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[0, 1:3, 1:3] = False
    assert torch.equal(mask, expected)
    # x2/y2 are exclusive: a box ending exactly on the centre 5 holds only the cells centred at 3.
    edge = BapHead.background_mask(torch.tensor([[[2.0, 2.0, 2.0, 5.0, 5.0]]]), (4, 4), IMAGE)
    assert (~edge).sum() == 1 and not edge[0, 1, 1]
    assert BapHead.background_mask(torch.zeros(2, 0, 5), (4, 4), IMAGE).all()


def test_queries_by_hand() -> None:
    head = hand_head()
    background = BapHead.background_mask(torch.tensor([[BOX]]), (4, 4), IMAGE)
    queries, valid = head.background_queries(hand_features(), background)
    assert valid.all()
    expected = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]])  # TL, TR, BL, BR
    assert torch.allclose(queries, expected, atol=1e-6)
    # grid 4 on a 4x4 map: one query per background cell; the 4 box cells are invalid grid cells.
    queries4, valid4 = head.background_queries(hand_features(), background, grid=4)
    assert valid4.sum() == 12 and not valid4[0, 5] and valid4[0, 4]
    assert torch.allclose(queries4[0, 13], torch.tensor([2.0, 0.0]))  # cell (3, 1)
    # grid 1: the mean of all 12 background cells: x = (3 + 0+2+1 + 1+3+2) / 12, y = (2+1 + 3) / 12.
    queries1, _ = head.background_queries(hand_features(), background, grid=1)
    assert torch.allclose(queries1[0, 0], torch.tensor([12 / 12, 6 / 12]), atol=1e-6)


def test_attention_by_hand() -> None:
    head = hand_head()
    background = BapHead.background_mask(torch.tensor([[BOX]]), (4, 4), IMAGE)
    attention = head.attention(hand_features(), background)
    expected = torch.ones(1, 4, 4)
    expected[0, 1, 1], expected[0, 1, 2], expected[0, 2, 1], expected[0, 2, 2] = A_11, A_12, A_21, A_22
    assert torch.allclose(attention, expected, atol=1e-6)


def hand_box_feature() -> tuple[float, float]:
    weights = [1 - A_11, 1 - A_12, 1 - A_21, 1 - A_22]
    vectors = [(3, 4), (-1, 0), (0, 2), (1, -1)]
    total = sum(weights)
    return (sum(w * v[0] for w, v in zip(weights, vectors, strict=True)) / total,
            sum(w * v[1] for w, v in zip(weights, vectors, strict=True)) / total)


def test_box_feature_is_the_one_minus_a_weighted_mean() -> None:
    head = hand_head()
    boxes = torch.tensor([[BOX, PAD]])
    background = BapHead.background_mask(boxes, (4, 4), IMAGE)
    r = head.box_features(hand_features(), boxes, head.attention(hand_features(), background), IMAGE)
    assert r.shape == (1, 2)  # the padding row gives no box feature
    assert torch.allclose(r[0], torch.tensor(hand_box_feature()), atol=1e-6)


def test_box_without_a_cell_centre_samples_its_centre_bilinearly() -> None:
    head = hand_head()
    # [4, 5) x [2, 3) holds no centre (1, 3, 5, 7). Its centre (4.5, 2.5) is at feature coordinates
    # u = 4.5/2 - 0.5 = 1.75, v = 2.5/2 - 0.5 = 0.75: rows 0/1 weigh 1/4, 3/4; cols 1/2 weigh 1/4, 3/4.
    boxes = torch.tensor([[[1.0, 4.0, 2.0, 5.0, 3.0]]])
    f = hand_features()
    r = head.box_features(f, boxes, torch.zeros(1, 4, 4), IMAGE)
    # f[0,1] = (1,0), f[0,2] = (0,2), f[1,1] = (3,4), f[1,2] = (-1,0)
    x = 1 / 16 * 1 + 3 / 16 * 0 + 3 / 16 * 3 + 9 / 16 * -1
    y = 1 / 16 * 0 + 3 / 16 * 2 + 3 / 16 * 4 + 9 / 16 * 0
    assert torch.allclose(r[0], torch.tensor([x, y]), atol=1e-6)


def test_box_that_looks_all_background_falls_back_to_its_mean() -> None:
    # Every cell points along (1, 0): A = 1 in the box, Σ(1 - A) = 0; r is the plain mean (GAP), not NaN.
    f = torch.zeros(1, 2, 4, 4)
    f[0, 0] = 1.0
    f[0, 0, 1:3, 1:3] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    head = hand_head()
    boxes = torch.tensor([[BOX]])
    attention = head.attention(f, BapHead.background_mask(boxes, (4, 4), IMAGE))
    assert torch.allclose(attention, torch.ones(1, 4, 4), atol=1e-6)
    r = head.box_features(f, boxes, attention, IMAGE)
    assert torch.allclose(r, torch.tensor([[2.5, 0.0]]), atol=1e-5)


def test_attention_agrees_with_the_numpy_generator() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = BapHead(5, 3, BapHeadConfig())
    height, width, h, w = 50, 45, 6, 7
    features = torch.randn(3, 5, h, w)
    boxes = torch.full((3, 3, 5), -1.0)
    for n, count in enumerate([1, 2, 3]):
        for b in range(count):
            x1, y1 = int(rng.integers(0, 30)), int(rng.integers(0, 30))
            boxes[n, b] = torch.tensor([b + 1, x1, y1, x1 + int(rng.integers(5, 20)), y1 + int(rng.integers(5, 25))])
    background = BapHead.background_mask(boxes, (h, w), (height, width))
    for grid in (1, 3, 4, 9):  # 3 and 4 split 6x7 unevenly; 9 leaves empty grid cells
        attention = head.attention(features, background, grid)
        for n in range(3):
            rows = boxes[n][boxes[n, :, 0] > 0].long().numpy()
            inside = cell_centres_in_boxes(rows, (h, w), (height, width))
            assert np.array_equal(~inside, background[n].numpy())
            reference = background_attention(features[n].numpy(), ~inside, grid)
            assert np.allclose(attention[n].numpy()[inside], reference[inside], atol=1e-5)
            assert (attention[n].numpy()[~inside] == 1.0).all()


def test_forward_and_cams_by_hand() -> None:
    head = hand_head(scale=2.0)
    f = torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    f[0, :, 0, 1] = torch.tensor([0.0, 0.0])  # a zero feature: cosine 0, not NaN
    cams = head.cams(f)
    # (3,4)/5 against w_1 = (0,1): 0.8; against w_2 = (-1,0): -0.6 -> 0.
    assert torch.allclose(cams, torch.tensor([[[[0.8, 0.0]], [[0.0, 0.0]]]]), atol=1e-6)
    # GAP = (1.5, 2): cosines 0.8 and -0.6, times the scale 2; no background column.
    assert torch.allclose(head(f), torch.tensor([[1.6, -1.2]]), atol=1e-6)


def test_linear_classifier_is_the_default_and_gives_eq6_cams_by_hand() -> None:
    assert BapHeadConfig().classifier == "linear"
    head = hand_head(scale=2.0, classifier="linear")
    f = torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    f[0, :, 0, 1] = torch.tensor([-2.0, 1.0])
    # Eq. 6: CAM_c = ReLU(f·w_c). Cell 0: w_1 = (0,1) -> 4, w_2 = (-1,0) -> ReLU(-3) = 0.
    # Cell 1: w_1 -> 1, w_2 -> 2. The scale plays no part.
    assert torch.allclose(head.cams(f), torch.tensor([[[[4.0, 1.0]], [[0.0, 2.0]]]]), atol=1e-6)
    # GAP = (0.5, 2.5): f·w_1 = 2.5, f·w_2 = -0.5; no background column.
    assert torch.allclose(head(f), torch.tensor([[2.5, -0.5]]), atol=1e-6)
    # (L+1)-way logits of a vector, column 0 = background w_0 = (1,0): (3, 4) -> [3, 4, -3].
    assert torch.allclose(head.classify(torch.tensor([[3.0, 4.0]])), torch.tensor([[3.0, 4.0, -3.0]]))
    assert torch.equal(head.class_weights(), head.weight.detach())


def test_linear_objective_by_hand() -> None:
    model = Model(hand_head(classifier="linear"))
    objective = BapObjective(BapLossConfig(), BapHeadConfig(grid=2))
    rx, ry = hand_box_feature()
    box = ce([rx, ry, -rx], 1)  # logits w_c·r with w_0 = (1,0), w_1 = (0,1), w_2 = (-1,0)
    # queries TL (1,0), TR (1,1), BL (2,0), BR (0,1), all class 0.
    bg = ce([1.0, 0.0, -1.0], 0) + ce([1.0, 1.0, -1.0], 0) + ce([2.0, 0.0, -2.0], 0) + ce([0.0, 1.0, 0.0], 0)
    loss, terms = objective(model, {"image": as_image(hand_features()), "boxes": torch.tensor([[BOX]])})
    assert loss.item() == pytest.approx((box + bg) / 5, abs=1e-5)
    assert terms["box_ce"].item() == pytest.approx(box / 5, abs=1e-5)


def hand_loss_terms() -> tuple[float, float]:
    """Σ CE of the box (class 1) and Σ CE of the 4 queries (class 0), logits 2·cos against w_0, w_1, w_2."""
    rx, ry = hand_box_feature()
    norm = math.hypot(rx, ry)
    box = ce([2 * rx / norm, 2 * ry / norm, -2 * rx / norm], 1)
    tl = ce([2.0, 0.0, -2.0], 0)  # (1,0); BL (2,0) is the same direction
    tr = ce([R2, R2, -R2], 0)  # (1,1)/√2
    br = ce([0.0, 2.0, 0.0], 0)  # (0,1)
    return box, 2 * tl + tr + br


def test_objective_by_hand_and_padding_rows_ignored() -> None:
    model = Model(hand_head())
    objective = BapObjective(BapLossConfig(), BapHeadConfig(grid=2, scale=2.0))
    box, bg = hand_loss_terms()
    for boxes in ([[BOX]], [[BOX, PAD, PAD]], [[PAD, BOX]]):
        loss, terms = objective(model, {"image": as_image(hand_features()), "target": torch.tensor([[1.0, 0.0]]),
                                        "boxes": torch.tensor(boxes)})
        # One mean over the 1 box + 4 queries, split into its two shares.
        assert loss.item() == pytest.approx((box + bg) / 5, abs=1e-5)
        assert terms["box_ce"].item() == pytest.approx(box / 5, abs=1e-5)
        assert terms["bg_ce"].item() == pytest.approx(bg / 5, abs=1e-5)
        # r ≈ (0.77, 1.78) points mostly along w_1 = (0,1): classified correctly.
        assert terms["box_accuracy"].item() == 1.0
        assert not terms["box_ce"].requires_grad


def test_objective_without_boxes_and_without_background() -> None:
    model = Model(hand_head())
    objective = BapObjective(BapLossConfig(), BapHeadConfig(grid=2, scale=2.0))
    # No box: only the 4 quadrant queries, each the mean of its 4 cells.
    f = torch.zeros(1, 2, 4, 4)
    f[0, 0, :2, :2] = 1.0  # TL (1,0)
    f[0, 1, :2, 2:] = 1.0  # TR (0,1)
    f[0, 0, 2:, :2] = -1.0  # BL (-1,0)
    f[0, :, 2:, 2:] = 1.0  # BR (1,1)
    loss, terms = objective(model, {"image": as_image(f), "boxes": torch.tensor([[PAD]])})
    expected = (ce([2.0, 0.0, -2.0], 0) + ce([0.0, 2.0, 0.0], 0) + ce([-2.0, 0.0, 2.0], 0) + ce([R2, R2, -R2], 0)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert terms["box_ce"].item() == 0.0 and terms["box_accuracy"].item() == 0.0
    # A box over the whole image: no background, no query, A = 0, r = plain mean of f = (0.25, 0.5), class 2.
    f.requires_grad_(True)
    loss, terms = objective(model, {"image": as_image(f), "boxes": torch.tensor([[[2.0, 0.0, 0.0, 8.0, 8.0]]])})
    norm = math.hypot(0.25, 0.5)
    assert loss.item() == pytest.approx(ce([0.5 / norm, 1.0 / norm, -0.5 / norm], 2), abs=1e-5)
    assert terms["bg_ce"].item() == 0.0 and terms["box_accuracy"].item() == 0.0  # argmax is class 1
    loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_gradcheck_through_bap_and_the_cosine_classifier() -> None:
    torch.manual_seed(0)
    head = BapHead(3, 2, BapHeadConfig(grid=2, scale=3.0, classifier="cosine")).double()
    model = Model(head)
    objective = BapObjective(BapLossConfig(), BapHeadConfig(grid=2, scale=3.0))
    boxes = torch.tensor([[[1.0, 2.0, 2.0, 6.0, 6.0], [2.0, 0.0, 4.0, 4.0, 8.0], PAD,
                           [2.0, 4.0, 2.0, 5.0, 3.0]]], dtype=torch.float64)  # the last holds no centre

    def objective_loss(features: torch.Tensor) -> torch.Tensor:
        return objective(model, {"image": as_image(features), "boxes": boxes})[0]

    features = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    # fast_mode (a random projection of the Jacobian) keeps the ~100 objective calls of a full check away.
    assert torch.autograd.gradcheck(objective_loss, (features,), fast_mode=True)

    attention = torch.rand(1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, a: head.box_features(f, boxes, a, IMAGE), (features, attention))

    vectors = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1])

    def classifier_loss(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(cosine_logits(v, w, 3.0), target)

    assert torch.autograd.gradcheck(classifier_loss, (vectors, weight))


def test_objective_on_a_resnet_tiny_classifier() -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierTrainConfig(backbone=BackboneConfig(name="resnet_tiny")), num_foreground=3)
    model.head = BapHead(model.backbone.out_channels, 3, BapHeadConfig())
    objective = BapObjective(BapLossConfig(), BapHeadConfig())
    boxes = torch.tensor([[[1.0, 4.0, 4.0, 30.0, 40.0], [3.0, 32.0, 10.0, 60.0, 60.0]],
                          [PAD, PAD]])  # the second image has no box
    batch = {"image": torch.randn(2, 3, 64, 64), "target": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
             "boxes": boxes}
    loss, terms = objective(model, batch)
    assert torch.isfinite(loss) and set(terms) == {"box_ce", "bg_ce", "box_accuracy"}
    assert loss.item() == pytest.approx((terms["box_ce"] + terms["bg_ce"]).item(), abs=1e-6)
    loss.backward()
    grad = model.backbone.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model(batch["image"]).shape == (2, 3) and model.cams(batch["image"]).shape == (2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, _ = objective(model, batch)
    assert bf16_loss.dtype == torch.float32 and torch.isfinite(bf16_loss)
