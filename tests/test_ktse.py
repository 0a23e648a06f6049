"""KTSE: GPP head and the SIE / SSR / MGA loss terms on hand-made tensors, expected values worked out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss_ray.config import ClassifierTrainConfig
from wsss_ray.core.config import BackboneConfig
from wsss_ray.methods.ktse.config import KtseHeadConfig, KtseLossConfig
from wsss_ray.methods.ktse.head import KtseHead, gated_fusion, gpp_pool
from wsss_ray.methods.ktse.losses import (
    KtseObjective,
    erase_keep_mask,
    foreground_mask,
    global_alignment,
    inter_class_loss,
    local_alignment,
    simulated_erasing_loss,
    simulated_pair,
    ssr_cross_entropy,
    ssr_pseudo_label,
)
from wsss_ray.methods.registry import build_classifier


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ GPP head


def test_gated_fusion_keeps_signs_apart() -> None:
    x, y = t([[[[2.0, -4.0]]]]), t([[[[-1.0, 6.0]]]])
    alpha = t([[[[0.5, 0.5]], [[0.25, 0.25]]]])  # (N, 2, h, w): weight of x, weight of y
    beta = t([[[[1.0, 1.0]], [[0.5, 0.5]]]])
    # pixel 0: positive (2·0.5 + 0·0.25)/2 = 0.5, negative (0·1 + 1·0.5)/2 = 0.25 → 0.25
    # pixel 1: positive (0·0.5 + 6·0.25)/2 = 0.75, negative (4·1 + 0·0.5)/2 = 2 → −1.25
    assert torch.allclose(gated_fusion(x, y, alpha, beta), t([[[[0.25, -1.25]]]]))


def test_gpp_pool_weights_positive_and_negative_evidence() -> None:
    f = t([[[[1.0, -2.0], [3.0, 0.0]]]])
    g = t([[[[2.0, -3.0], [1.0, 4.0]]]])
    # GAP(ReLU f · ReLU g) = (1·2 + 3·1)/4 = 1.25; GAP(ReLU(−f) · ReLU(−g)) = (2·3)/4 = 1.5
    assert torch.allclose(gpp_pool(f, g), t([[-0.25]]))


def _head_with_identity_features(pyramid: list[int]) -> KtseHead:
    # in_channels 1, one foreground class: F_0 = 0.5·x (background), F_1 = x; gates output 0 → σ = 0.5.
    head = KtseHead(1, 1, KtseHeadConfig(pyramid=pyramid))
    with torch.no_grad():
        head.classifier.weight.copy_(t([[[[0.5]]], [[[1.0]]]]))
        for gate in head.gates:
            gate.positive.weight.zero_()
            gate.negative.weight.zero_()
    return head


def test_gpp_single_level_is_gap_weighted_cam() -> None:
    head = _head_with_identity_features([1])
    assert len(head.gates) == 0
    x = t([[[[1.0, -2.0], [3.0, 0.0]]]])
    # G = mean(F_1) = 0.5 everywhere: q = (1·0.5 + 3·0.5)/4 − 0 = 0.5
    assert torch.allclose(head(x), t([[0.5]]))


def test_gpp_two_levels_with_half_gates() -> None:
    head = _head_with_identity_features([1, 2])
    assert len(head.gates) == 1
    x = t([[[[1.0, -2.0], [3.0, 0.0]]]])
    # P_1 = 0.5 everywhere, P_2 = F_1 (2x2 pooling of a 2x2 map); both gates σ(0) = 0.5:
    # G = (ReLU(P_1)/2 + ReLU(P_2)/2)/2 − (ReLU(−P_1)/2 + ReLU(−P_2)/2)/2 = (P_1 + P_2)/4
    #   = [[0.375, −0.375], [0.875, 0.125]]
    # q = (1·0.375 + 3·0.875)/4 − (2·0.375)/4 = 0.75 − 0.1875 = 0.5625
    assert torch.allclose(head(x), t([[0.5625]]))


def test_ktse_head_shapes_and_cams() -> None:
    torch.manual_seed(0)
    head = KtseHead(8, 2, KtseHeadConfig())
    assert len(head.gates) == 2  # pyramid [1, 2, 4]
    features = torch.randn(2, 8, 4, 4)
    cam_features = head.cam_features(features)
    assert cam_features.shape == (2, 3, 4, 4)
    assert head(features).shape == (2, 2)
    cams = head.cams(features)
    assert cams.shape == (2, 2, 4, 4) and (cams >= 0).all()
    assert torch.equal(cams, F.relu(cam_features[:, 1:]))
    # A 3x5 map works with every pyramid level (adaptive pooling, then back to h×w).
    assert head(torch.randn(1, 8, 3, 5)).shape == (1, 2)


# --------------------------------------------------------------------------------------------------- SIE


def test_simulated_pair_concatenates_along_width() -> None:
    a, b = t([[[[1.0, 2.0]]]]), t([[[[3.0, 4.0]]]])
    pair = simulated_pair(torch.cat([a, b]))
    assert torch.equal(pair, t([[[[1.0, 2.0, 3.0, 4.0]]], [[[3.0, 4.0, 1.0, 2.0]]]]))
    # A batch of one pairs with its own mirror image.
    assert torch.equal(simulated_pair(a), t([[[[1.0, 2.0, 2.0, 1.0]]]]))


def test_simulated_erasing_loss_by_hand() -> None:
    f_a = t([[[[2.0, 1.0], [0.0, 3.0]], [[9.0, 9.0], [9.0, 9.0]]],
             [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]]]])
    f_s = t([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]],
             [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]])
    present = torch.tensor([[True, False], [True, True]])
    # image 0, class 0: ReLU([1, 0, −1, 2]) sums to 3 (class 1 absent: its 9s do not count);
    # image 1: class 0 gives 1, class 1 gives 3 → 7 over 3 present channels × 4 pixels.
    assert torch.allclose(simulated_erasing_loss(f_a, f_s, present), torch.tensor(7 / 12))
    # Only where the anchor activates more: the reverse direction is 0 for image 0 class 0 except one pixel.
    assert torch.allclose(simulated_erasing_loss(f_s[:1], f_a[:1], present[:1]), torch.tensor(1 / 4))


def test_alignment_terms_with_no_present_class_are_zero_with_gradient() -> None:
    f_a = torch.randn(1, 2, 2, 2, requires_grad=True)
    f_b = torch.randn(1, 2, 2, 2)
    none = torch.zeros(1, 2, dtype=torch.bool)
    for loss in (simulated_erasing_loss(f_a, f_b, none), local_alignment(f_a, f_b, none),
                 global_alignment(f_a, f_b, none)):
        assert loss.item() == 0.0 and torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, f_a)
        assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------------------------------- SSR


def test_ssr_pseudo_label_thresholds_and_present_classes() -> None:
    # (N=1, C+1=3, 1x5): channel 0 background, class 1 present, class 2 absent but strongly active.
    features = t([[[[0.0, 7.0, 0.0, 0.0, 0.0]],
                   [[10.0, 5.0, 2.0, 1.0, -1.0]],
                   [[50.0, 50.0, 50.0, 50.0, 50.0]]]])
    present = torch.tensor([[True, False]])
    # A_1 = [1, 0.5, 0.2, 0.1, 0]: ≥ 0.3 → argmax over the present foreground classes; ≤ 0.15 → 0; else 255.
    # Pixel 1 is confident: class 1 although the background channel's 7 exceeds its 5 (the background channel
    # does not vote in the argmax), and never the absent class 2 whatever its activation.
    label = ssr_pseudo_label(features, present, beta_h=0.3, beta_l=0.15)
    assert label.dtype == torch.long
    assert label.tolist() == [[[1, 1, 255, 0, 0]]]


def test_ssr_pseudo_label_boundaries_and_two_classes() -> None:
    # Image 0: class 1 = [8, 4, 2, 0] → A = [1, 0.5, 0.25, 0]: A = β_h is foreground, A = β_l background.
    # Image 1: both classes present; A_1 = [1, 0, 0, 0.25], A_2 = [0.5, 1, 0, 0]; argmax of F among 1, 2.
    features = t([[[[0.0, 0.0, 0.0, 0.0]], [[8.0, 4.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]],
                  [[[0.0, 0.0, 0.0, 0.0]], [[4.0, 0.0, 0.0, 1.0]], [[3.0, 6.0, 0.0, 0.0]]]])
    present = torch.tensor([[True, False], [True, True]])
    label = ssr_pseudo_label(features, present, beta_h=0.5, beta_l=0.25)
    assert label.tolist() == [[[1, 1, 0, 0]], [[1, 2, 0, 0]]]
    # No class present: the whole image is background.
    assert ssr_pseudo_label(features[:1], torch.zeros(1, 2, dtype=torch.bool), 0.5, 0.25).tolist() == [[[0] * 4]]


def test_ssr_cross_entropy_discounts_foreground_of_complex_images() -> None:
    # Pixel 0 labelled background with logits (0, 0, 0); pixel 1 labelled class 1 with (1, 2, 0); pixel 2 ignored.
    features = t([[[[0.0, 1.0, 5.0]], [[0.0, 2.0, -5.0]], [[0.0, 0.0, 3.0]]]])
    label = torch.tensor([[[0, 1, 255]]])
    background = math.log(3)
    foreground = math.log(1 + math.e + math.e**2) - 2
    simple = ssr_cross_entropy(features, label, torch.tensor([[True, False]]), omega_fg=0.0125)
    assert math.isclose(simple.item(), (background + foreground) / 2, rel_tol=1e-6)
    complex_ = ssr_cross_entropy(features, label, torch.tensor([[True, True]]), omega_fg=0.0125)
    assert math.isclose(complex_.item(), (background + 0.0125 * foreground) / 2, rel_tol=1e-6)


def test_ssr_cross_entropy_all_ignored_is_zero_with_gradient() -> None:
    features = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = ssr_cross_entropy(features, torch.full((1, 2, 2), 255), torch.tensor([[True, True]]), 0.0125)
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and torch.equal(features.grad, torch.zeros_like(features))


def test_foreground_mask_threshold() -> None:
    f_fg = t([[[[4.0, 1.0, 0.5]], [[0.0, 9.0, 9.0]]]])
    # Present class 0 only: A = [1, 0.25, 0.125]; β_o = 0.25 keeps the first two pixels.
    assert foreground_mask(f_fg, torch.tensor([[True, False]]), 0.25).tolist() == [[[True, True, False]]]


def test_inter_class_loss_by_hand() -> None:
    # Image 0 (complex: classes 0 and 1 present, class 2 absent but largest); image 1 simple.
    f_fg = t([[[[3.0, 1.0, 5.0]], [[1.0, 2.0, 0.0]], [[9.0, 9.0, 9.0]]],
              [[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]])
    present = torch.tensor([[True, True, False], [True, False, False]])
    fg_mask = torch.tensor([[[True, True, False]], [[True, True, True]]])
    # Image 0, pixels 0 and 1 in M^f: V^2nd − V^max = 1 − 3 = −2 and 1 − 2 = −1; image 1 does not count.
    assert torch.allclose(inter_class_loss(f_fg, present, fg_mask), torch.tensor(-1.5))


def test_inter_class_loss_without_complex_images_is_zero_with_gradient() -> None:
    f_fg = torch.randn(2, 3, 2, 2, requires_grad=True)
    present = torch.tensor([[True, False, False], [False, False, False]])
    loss = inter_class_loss(f_fg, present, torch.ones(2, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert f_fg.grad is not None and torch.isfinite(f_fg.grad).all() and (f_fg.grad == 0).all()


# --------------------------------------------------------------------------------------------------- MGA


def test_erase_keep_mask_by_hand() -> None:
    f_fg = t([[[[10.0, 7.0], [5.0, 0.0]], [[20.0, 20.0], [20.0, 20.0]]]])
    # Present class 0: A = [[1, 0.7], [0.5, 0]]; erased where A > 0.6 (the absent class is ignored).
    keep = erase_keep_mask(f_fg, torch.tensor([[True, False]]), (2, 2), 0.6)
    assert keep.tolist() == [[[[0.0, 0.0], [1.0, 1.0]]]]
    # Upsampled to the image: a flat CAM is erased everywhere, an inactive one nowhere.
    flat = erase_keep_mask(torch.ones(1, 2, 2, 2), torch.tensor([[True, False]]), (8, 8), 0.6)
    assert flat.shape == (1, 1, 8, 8) and (flat == 0).all()
    assert (erase_keep_mask(-torch.ones(1, 2, 2, 2), torch.tensor([[True, False]]), (8, 8), 0.6) == 1).all()


def test_global_alignment_is_l1_of_gap_over_present_classes() -> None:
    f_a = t([[[[1.0, -1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, -2.0]]]])
    f_m = t([[[[0.0, 0.0], [2.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]]])
    # class 0: GAP(ReLU) 4/4 = 1 vs 2/4 = 0.5 → 0.5; class 1: 0 vs 4/4 = 1 → 1.
    assert torch.allclose(global_alignment(f_a, f_m, torch.tensor([[True, True]])), torch.tensor(0.75))
    assert torch.allclose(global_alignment(f_a, f_m, torch.tensor([[True, False]])), torch.tensor(0.5))


def test_local_alignment_by_hand() -> None:
    f_m = t([[[[2.0, 0.0], [4.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    f_a = t([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    # Present class 0: ReLU(F̂_m − F̂_a) = [1, 0, 3, 0] → 4/4.
    assert torch.allclose(local_alignment(f_m, f_a, torch.tensor([[True, False]])), torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------ gradcheck


def test_gradcheck_custom_terms() -> None:
    torch.manual_seed(0)
    opts = {"dtype": torch.float64, "requires_grad": True}
    a, b = torch.randn(2, 3, 2, 2, **opts), torch.randn(2, 3, 2, 2, **opts)
    present = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda x, y: simulated_erasing_loss(x, y, present), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: local_alignment(x, y, present), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: global_alignment(x, y, present), (a, b))
    fg_mask = torch.tensor([[[True, False], [True, True]], [[True, True], [False, True]]])
    assert torch.autograd.gradcheck(lambda x: inter_class_loss(x, present, fg_mask), (a,))
    label = torch.tensor([[[0, 1], [255, 2]], [[3, 0], [1, 255]]])
    features = torch.randn(2, 4, 2, 2, **opts)
    assert torch.autograd.gradcheck(lambda x: ssr_cross_entropy(x, label, present, 0.0125), (features,))
    x, y = torch.randn(1, 3, 2, 2, **opts), torch.randn(1, 3, 2, 2, **opts)
    alpha, beta = torch.rand(1, 2, 2, 2, **opts), torch.rand(1, 2, 2, 2, **opts)
    assert torch.autograd.gradcheck(gated_fusion, (x, y, alpha, beta))
    assert torch.autograd.gradcheck(gpp_pool, (x, y))


# ------------------------------------------------------------------------------------------------ objective


def _model(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_classifier(ClassifierTrainConfig(backbone=BackboneConfig(name="resnet_tiny")), num_classes)
    model.head = KtseHead(model.backbone.out_channels, num_classes, KtseHeadConfig())
    return model


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"image": torch.randn(2, 3, 32, 32), "target": t([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}


def test_all_switches_off_is_multilabel_soft_margin() -> None:
    model, batch = _model(), _batch()
    objective = KtseObjective(KtseLossConfig(sie=False, ssr=False, mga=False))
    loss, terms = objective(model, batch)
    expected = F.multilabel_soft_margin_loss(model.head(model.backbone(batch["image"])), batch["target"])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(terms) == {"cls"}


def test_full_objective_reaches_backbone() -> None:
    model, batch = _model(), _batch()
    config = KtseLossConfig()
    loss, terms = KtseObjective(config)(model, batch)
    assert set(terms) == {"cls", "kt", "ce", "inter", "global", "local"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) and not v.requires_grad for v in terms.values())
    weighted = sum(v for k, v in terms.items() if k != "inter") + config.lambda_inter * terms["inter"]
    assert torch.allclose(loss.detach(), weighted, atol=1e-6)
    loss.backward()
    grad = model.backbone.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("switches", [{"sie": True, "ssr": False, "mga": False}, {"sie": False, "ssr": True,
                                                                                    "mga": True}])
def test_partial_objective_terms_and_batch_of_one(switches: dict[str, bool]) -> None:
    model = _model()
    batch = {"image": torch.randn(1, 3, 32, 32), "target": t([[0.0, 1.0, 1.0]])}
    loss, terms = KtseObjective(KtseLossConfig(**switches))(model, batch)
    names = {"cls"} | ({"kt"} if switches["sie"] else set()) | ({"ce", "inter"} if switches["ssr"] else set())
    names |= {"global", "local"} if switches["mga"] else set()
    assert set(terms) == names and torch.isfinite(loss)


def test_objective_under_bf16_autocast_returns_float32() -> None:
    model, batch = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = KtseObjective(KtseLossConfig())(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
