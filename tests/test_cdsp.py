"""CDSP losses against hand-worked values, gradcheck, and the empty / ignored edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from wsss_ray.methods.cdsp.losses import LoRM, distance_entropy_loss, partial_cross_entropy, smoothed_cross_entropy
from wsss_ray.methods.cdsp.objective import lorm_foreground

IGN = 255


def _logits(*pixels: tuple[float, float]) -> torch.Tensor:
    """A (1, 2, 1, W) logit map from a row of per-pixel (class 0, class 1) logits."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 1, len(pixels))


def _entropy(probs: tuple[float, ...]) -> float:
    return -sum(p * math.log(p) for p in probs)


# ---------------------------------------------------------------- partial / smoothed cross-entropy


def test_partial_ce_averages_scribbled_pixels_only() -> None:
    # Pixel 0: logits (log 3, 0) → p = (3/4, 1/4), scribble 0. Pixel 1: unscribbled, huge logits that would
    # dominate if counted. Pixel 2: logits (0, 0), scribble 1 → p = 1/2.
    logits = _logits((math.log(3), 0.0), (50.0, -50.0), (0.0, 0.0))
    scribble = torch.tensor([[[0, IGN, 1]]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert partial_cross_entropy(logits, scribble).item() == pytest.approx(expected, rel=1e-6)


def test_partial_ce_counts_over_the_whole_batch() -> None:
    # Image 0 has one scribbled pixel, image 1 has two: the mean runs over the three, not per image.
    logits = torch.zeros(2, 2, 1, 2)
    logits[0, 0, 0, 0] = math.log(3)  # p = (3/4, 1/4)
    scribble = torch.tensor([[[0, IGN]], [[1, 0]]])
    expected = (-math.log(0.75) - 2 * math.log(0.5)) / 3
    assert partial_cross_entropy(logits, scribble).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_fn", [partial_cross_entropy, smoothed_cross_entropy])
def test_ce_with_nothing_labelled_is_zero_with_gradient(loss_fn) -> None:
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = loss_fn(logits, torch.full((2, 2, 2), IGN))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_smoothed_ce_matches_eq9_by_hand() -> None:
    # K = 2, ε = 0.1. Pixel 0: p = (3/4, 1/4), label 0. Pixel 1 ignored. Pixel 2: p = (1/2, 1/2), label 1.
    logits = _logits((math.log(3), 0.0), (-40.0, 40.0), (0.0, 0.0))
    target = torch.tensor([[[0, IGN, 1]]])
    eps = 0.1
    pix0 = (1 - eps) * -math.log(0.75) + eps * -(math.log(0.75) + math.log(0.25)) / 2
    pix2 = (1 - eps) * -math.log(0.5) + eps * -(math.log(0.5) + math.log(0.5)) / 2
    assert smoothed_cross_entropy(logits, target).item() == pytest.approx((pix0 + pix2) / 2, rel=1e-6)
    # ε = 0 is the plain CE of the labelled pixels.
    plain = (-math.log(0.75) - math.log(0.5)) / 2
    assert smoothed_cross_entropy(logits, target, label_smoothing=0.0).item() == pytest.approx(plain, rel=1e-6)


def test_smoothed_ce_rejects_bad_epsilon() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        smoothed_cross_entropy(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), 1.5)


def test_ce_losses_gradcheck() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, IGN], [2, 1]], [[IGN, IGN], [1, 0]]])
    assert torch.autograd.gradcheck(lambda x: partial_cross_entropy(x, target), (logits,))
    assert torch.autograd.gradcheck(lambda x: smoothed_cross_entropy(x, target, 0.1), (logits,))


def test_ce_losses_are_float32_under_bf16() -> None:
    logits = torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = smoothed_cross_entropy(logits, target, 0.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


# ---------------------------------------------------------------- LoRM


def _hand_lorm(delta: float = 1.0, mask: str = "columns", reduction: str = "foreground",
               key_scale: tuple[float, float] = (1.0, 2.0)) -> LoRM:
    """D = 2, channels = 2, W_Q = I, W_K = diag(key_scale), no bias: A is computable by hand."""
    module = LoRM(in_channels=2, channels=2, mask=mask, reduction=reduction)
    with torch.no_grad():
        module.query.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        module.key.weight.copy_(torch.diag(torch.tensor(key_scale)).reshape(2, 2, 1, 1))
        module.query.bias.zero_()
        module.key.bias.zero_()
        module.delta.fill_(delta)
    return module


# Three positions on a 1×3 map: f1 = (1, 0), f2 = (0, 1), f3 = (1, 1); foreground = positions 1 and 3.
_FEATS = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])  # (1, D=2, 1, 3)
_FG = torch.tensor([[[1.0, 0.0, 1.0]]])


def _lorm_by_loops(feats: list[tuple[float, float]], fg: list[float], key_scale: tuple[float, float], delta: float,
                   rows: bool, all_nonzero: bool) -> float:
    """Eqs. 10-13 written out per position with plain floats (W_Q = I, W_K = diag(key_scale), no bias)."""
    n = len(feats)
    queries = feats
    keys = [(f[0] * key_scale[0], f[1] * key_scale[1]) for f in feats]

    def cos(a: tuple[float, float], b: tuple[float, float]) -> float:
        # cos with each norm floored at ε = 1e-6 (a zero vector has cosine 0 to everything).
        return (a[0] * b[0] + a[1] * b[1]) / (max(math.hypot(*a), 1e-6) * max(math.hypot(*b), 1e-6))

    squared: list[list[float]] = []
    for i in range(n):
        e = [math.exp(cos(queries[i], keys[j])) for j in range(n)]
        a = [e[j] / sum(e) * (fg[i] if rows else fg[j]) for j in range(n)]
        refined = [delta * sum(a[j] * feats[j][d] for j in range(n)) for d in range(2)]
        squared.append([(feats[i][d] - refined[d]) ** 2 for d in range(2)])
    if all_nonzero:
        values = [v for row in squared for v in row]
        return sum(values) / max(sum(1 for v in values if v != 0.0), 1)
    return sum(fg[i] * sum(squared[i]) for i in range(n)) / max(2 * sum(fg), 1)


_F_LIST = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
_FG_LIST = [1.0, 0.0, 1.0]


def test_lorm_rows_allpositions() -> None:
    # The paper/authors' LoRM: rows (queries) masked, MSE over every position / count_nonzero. Spec numbers:
    # W_K = I gives A's rows (0.473041, 0.174022, 0.352937), ..., F̂2 = 0 and L = 0.2974439.
    expected = _lorm_by_loops(_F_LIST, _FG_LIST, (1.0, 1.0), 1.0, rows=True, all_nonzero=True)
    assert expected == pytest.approx(0.2974439, abs=1e-6)
    module = _hand_lorm(mask="rows", reduction="all_nonzero", key_scale=(1.0, 1.0))
    assert module(_FEATS, _FG).item() == pytest.approx(expected, rel=1e-5)
    # The old reading (columns, foreground mean) is a different number on the same input: 0.1507433.
    old = _hand_lorm(key_scale=(1.0, 1.0))(_FEATS, _FG).item()
    assert old == pytest.approx(0.1507433, abs=1e-6) and abs(old - expected) > 0.1


@pytest.mark.parametrize("delta", [1.0, 0.7])
def test_lorm_rows_with_unequal_key_weights(delta: float) -> None:
    expected = _lorm_by_loops(_F_LIST, _FG_LIST, (1.0, 2.0), delta, rows=True, all_nonzero=True)
    assert _hand_lorm(delta, "rows", "all_nonzero")(_FEATS, _FG).item() == pytest.approx(expected, rel=1e-5)
    # Rows masked with the foreground mean (mixed options) also follows the formula.
    mixed = _lorm_by_loops(_F_LIST, _FG_LIST, (1.0, 2.0), delta, rows=True, all_nonzero=False)
    assert _hand_lorm(delta, "rows", "foreground")(_FEATS, _FG).item() == pytest.approx(mixed, rel=1e-5)


def test_lorm_count_nonzero_skips_exactly_zero_errors() -> None:
    # A background position with F = 0 has F̂ = 0 under row masking: its two squared errors are exactly 0 and
    # leave the denominator (the authors' count_nonzero), unlike a plain mean over all 3·2 entries.
    feats = [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0)]
    tensor = torch.tensor(feats).T.reshape(1, 2, 1, 3)
    expected = _lorm_by_loops(feats, _FG_LIST, (1.0, 1.0), 1.0, rows=True, all_nonzero=True)
    module = _hand_lorm(mask="rows", reduction="all_nonzero", key_scale=(1.0, 1.0))
    loss = module(tensor, _FG).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss != pytest.approx(expected * 4 / 6, rel=1e-3)


def test_lorm_default_is_the_papers_and_square() -> None:
    module = LoRM(in_channels=6)
    assert module.mask == "rows" and module.reduction == "all_nonzero"
    assert tuple(module.query.weight.shape) == (6, 6, 1, 1) and module.query.bias is not None
    assert torch.equal(module.key.bias, torch.zeros(6))


def _hand_expected(delta: float) -> float:
    # The old reading (columns masked, mean over foreground positions): kept as the option it now is.
    # Q_i = f_i; K: k1 = (1, 0), k2 = (0, 2), k3 = (1, 2).
    # Row 1: cos(q1, ·) = (1, 0, 1/√5). Row 3: cos(q3, ·) = (1/√2, 1/√2, 3/√10).
    z1 = math.e + 1.0 + math.exp(1 / math.sqrt(5))
    a11, a13 = math.e / z1, math.exp(1 / math.sqrt(5)) / z1  # column 2 (background) masked out
    z3 = 2 * math.exp(1 / math.sqrt(2)) + math.exp(3 / math.sqrt(10))
    a31, a33 = math.exp(1 / math.sqrt(2)) / z3, math.exp(3 / math.sqrt(10)) / z3
    # F̂_1 = δ(a11·f1 + a13·f3), F̂_3 = δ(a31·f1 + a33·f3); position 2 is background, so not in the loss.
    r1 = (delta * (a11 + a13), delta * a13)
    r3 = (delta * (a31 + a33), delta * a33)
    squared = (1 - r1[0]) ** 2 + (0 - r1[1]) ** 2 + (1 - r3[0]) ** 2 + (1 - r3[1]) ** 2
    return squared / (2 * 2)  # 2 foreground positions × D = 2


@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_lorm_matches_hand_computed_attention(delta: float) -> None:
    loss = _hand_lorm(delta)(_FEATS, _FG)
    assert loss.item() == pytest.approx(_hand_expected(delta), rel=1e-5)


def test_lorm_is_cosine_so_feature_scale_of_one_position_only_moves_its_own_term() -> None:
    # Scaling f2 (background) by 10 leaves every cosine, hence A', unchanged, and f2 is in no foreground term.
    feats = _FEATS.clone()
    feats[:, :, :, 1] *= 10
    assert _hand_lorm()(feats, _FG).item() == pytest.approx(_hand_expected(1.0), rel=1e-5)


def test_lorm_image_without_foreground_contributes_nothing() -> None:
    torch.manual_seed(0)
    module = _hand_lorm()
    other = torch.randn(1, 2, 1, 3)
    feats = torch.cat([_FEATS, other])
    fg = torch.cat([_FG, torch.zeros(1, 1, 3)])
    assert module(feats, fg).item() == pytest.approx(_hand_expected(1.0), rel=1e-5)


def test_lorm_without_any_foreground_is_zero_with_gradient() -> None:
    torch.manual_seed(0)
    module = LoRM(in_channels=3, channels=4, mask="columns", reduction="foreground")
    feats = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = module(feats, torch.zeros(2, 2, 2))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.equal(feats.grad, torch.zeros_like(feats))
    assert module.delta.grad is not None and module.delta.grad.item() == 0.0


def test_lorm_delta_and_projections_receive_gradients() -> None:
    module = _hand_lorm()
    feats = _FEATS.clone().requires_grad_(True)
    module(feats, _FG).backward()
    # dL/dδ by hand: L(δ) is quadratic in δ; central difference of the hand formula.
    h = 1e-4
    expected = (_hand_expected(1.0 + h) - _hand_expected(1.0 - h)) / (2 * h)
    assert module.delta.grad.item() == pytest.approx(expected, rel=1e-3)
    assert module.query.weight.grad.abs().sum() > 0 and module.key.weight.grad.abs().sum() > 0
    assert feats.grad.abs().sum() > 0


def test_lorm_gradcheck_double_including_delta() -> None:
    torch.manual_seed(0)
    module = LoRM(in_channels=3, channels=2).double()
    feats = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    fg = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    names = ["delta", "query.weight", "query.bias", "key.weight", "key.bias"]
    params = tuple(dict(module.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)
    with torch.no_grad():
        params[0].fill_(1.3)  # away from the initial 1 so that δ's derivative is not special

    def fn(x: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return functional_call(module, dict(zip(names, p)), (x, fg))

    assert torch.autograd.gradcheck(fn, (feats, *params))


def test_lorm_runs_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    module = LoRM(in_channels=4, channels=3)
    feats = torch.randn(1, 4, 2, 3, dtype=torch.bfloat16)
    fg = torch.ones(1, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(feats, fg)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_lorm_rows_all_zero_features_give_zero_with_gradient() -> None:
    # Nothing to average (every squared error exactly 0): 0, not NaN, and a gradient path for DDP.
    torch.manual_seed(0)
    module = LoRM(in_channels=3)
    feats = torch.zeros(2, 3, 2, 2, requires_grad=True)
    loss = module(feats, torch.ones(2, 2, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_lorm_foreground_is_bilinear_on_label_values_with_255_as_background() -> None:
    # 1×4 → 1×3 with align_corners=True samples x = 0, 1.5, 3 (x_out · (4 − 1)/(3 − 1)).
    label = torch.tensor([[[0, 0, 1, 255]], [[255, 0, 0, 0]], [[0, 2, 0, 0]]])
    by_hand = []
    for row in label[:, 0].tolist():
        values = [0 if v == IGN else v for v in row]
        sampled = []
        for x in (0.0, 1.5, 3.0):
            left = math.floor(x)
            right = min(left + 1, 3)
            sampled.append((1 - (x - left)) * values[left] + (x - left) * values[right])
        by_hand.append([[1.0 if v > 0 else 0.0 for v in sampled]])
    assert by_hand == [[[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]
    copy = label.clone()
    assert lorm_foreground(label, (1, 3)).tolist() == by_hand
    assert torch.equal(label, copy)  # the caller's label is not overwritten (the authors' in-place 255 → 0)


def test_lorm_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="foreground"):
        LoRM(2)(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 3))


# ---------------------------------------------------------------- distance entropy loss


def test_distance_entropy_matches_hand_values() -> None:
    # Pixel a: logits (0, 0) → H = log 2. Pixel b: logits (log 3, 0) → p = (3/4, 1/4). Pixel c: H irrelevant.
    logits = _logits((0.0, 0.0), (math.log(3), 0.0), (5.0, -2.0))
    h_a, h_b = math.log(2), _entropy((0.75, 0.25))
    d_s = torch.tensor([[[1.0, 0.5, 0.0]]])  # N_s = 2
    d_c = torch.tensor([[[0.0, 0.25, 0.0]]])  # N_c = 1
    loss, terms = distance_entropy_loss(logits, d_s, d_c)
    expected_ds = (1.0 * h_a + 0.5 * h_b) / 2
    expected_dc = 0.25 * h_b / 1
    assert terms["ds"].item() == pytest.approx(expected_ds, rel=1e-6)
    assert terms["dc"].item() == pytest.approx(expected_dc, rel=1e-6)
    assert loss.item() == pytest.approx(expected_ds + expected_dc, rel=1e-6)
    assert loss.item() > 0  # +d·H, not the printed d·p log p
    assert not terms["ds"].requires_grad and not terms["dc"].requires_grad


def test_distance_entropy_descent_makes_weighted_pixels_confident() -> None:
    # One pixel p = (3/4, 1/4), d_s = 1: a gradient step must raise the winning logit's margin (entropy falls).
    logits = _logits((math.log(3), 0.0)).requires_grad_(True)
    loss, _ = distance_entropy_loss(logits, torch.ones(1, 1, 1), torch.zeros(1, 1, 1))
    loss.backward()
    # dH/dz0 = −p0·p1·(log p0 − log p1) = −(3/16)·log 3 < 0, so descent raises z0.
    assert logits.grad[0, 0, 0, 0].item() == pytest.approx(-(3 / 16) * math.log(3), rel=1e-5)
    assert logits.grad[0, 1, 0, 0].item() == pytest.approx((3 / 16) * math.log(3), rel=1e-5)


def test_distance_entropy_counts_non_zero_weights_over_the_batch() -> None:
    logits = torch.zeros(2, 2, 1, 1)  # H = log 2 everywhere
    d_s = torch.tensor([[[0.5]], [[0.0]]])  # one non-zero weight in the batch
    d_c = torch.tensor([[[1.0]], [[1.0]]])
    _, terms = distance_entropy_loss(logits, d_s, d_c)
    assert terms["ds"].item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert terms["dc"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_distance_entropy_without_weights_is_zero_with_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    zeros = torch.zeros(2, 2, 2)
    loss, terms = distance_entropy_loss(logits, zeros, zeros)
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert terms["ds"].item() == 0.0 and terms["dc"].item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_distance_entropy_gradcheck() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    d_s = torch.tensor([[[1.0, 0.2], [0.0, 0.7]], [[0.0, 0.0], [0.4, 1.0]]], dtype=torch.float64)
    d_c = torch.tensor([[[0.0, 0.9], [0.3, 0.0]], [[1.0, 0.5], [0.0, 0.1]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distance_entropy_loss(x, d_s, d_c)[0], (logits,))


def test_distance_entropy_is_float32_under_bf16() -> None:
    logits = torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16)
    d = torch.ones(1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = distance_entropy_loss(logits, d, d)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_distance_entropy_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="distance maps"):
        distance_entropy_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))
