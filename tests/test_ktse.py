"""KTSE: GPP head and the SIE / SSR / MGA loss terms on hand-made tensors, expected values worked out here
(the authors' formulas written out per pixel in plain Python, never by calling the implementation)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from wsss_ray.core.config_base import BackboneConfig
from wsss_ray.methods.ktse.config import KtseHeadConfig, KtseLossConfig
from wsss_ray.methods.ktse.head import KtseHead, gated_fusion, gpp_pool
from wsss_ray.methods.ktse.losses import (
    erase_keep_mask,
    global_alignment,
    local_alignment,
    simulated_erasing_loss,
    stack_pairs,
)
from wsss_ray.methods.ktse.objective import KtseObjective
from wsss_ray.methods.ktse.ssr import (
    anchor_cam,
    foreground_mask,
    inter_class_loss,
    max_norm,
    peak_norm,
    rectified_up,
    split_cross_entropy,
    ssr_cross_entropy,
    ssr_pseudo_label,
)
from wsss_ray.methods.registry import build_classifier
from wsss_ray.pipeline_config import ClassifierTrainConfig


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
    assert len(head.gates) == 3  # pyramid [2, 4, 8, 16]
    features = torch.randn(2, 8, 4, 4)
    cam_features = head.cam_features(features)
    assert cam_features.shape == (2, 3, 4, 4)
    assert head(features).shape == (2, 2)
    cams = head.cams(features)
    assert cams.shape == (2, 2, 4, 4) and (cams >= 0).all()
    assert torch.equal(cams, F.relu(cam_features[:, 1:]))
    # A 3x5 map works with every pyramid level (adaptive pooling, then back to h×w).
    assert head(torch.randn(1, 8, 3, 5)).shape == (1, 2)


def test_gpp_pools_the_foreground_channels_only() -> None:
    """Authors' cam2logit(cam_seg[:, 1:]): the logits do not depend on the background channel F_0, and the gates
    see the C foreground channels; gpp_channels="all" (former reading) gates all C+1."""
    torch.manual_seed(0)
    features = torch.randn(2, 8, 4, 4)
    head = KtseHead(8, 2, KtseHeadConfig())
    assert head.gates[0].positive.in_channels == 2 * 2
    before = head(features)
    with torch.no_grad():
        head.classifier.weight[0].mul_(-3.0)  # another background channel
    assert torch.equal(head(features), before)
    torch.manual_seed(0)
    former = KtseHead(8, 2, KtseHeadConfig(gpp_channels="all"))
    assert former.gates[0].positive.in_channels == 2 * 3
    before = former(features)
    with torch.no_grad():
        former.classifier.weight[0].mul_(-3.0)
    assert not torch.allclose(former(features), before)  # the gates read F_0


def ce(logits: list[float], k: int) -> float:
    """Softmax cross-entropy of one pixel, written out."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[k]


def relu(values: list[float]) -> list[float]:
    return [max(v, 0.0) for v in values]


# ------------------------------------------------------------------------------------------------ CAM maps


def test_rectified_up_applies_relu_before_resizing() -> None:
    # Bilinear 1x2 → 1x4 (align_corners=False) samples x = 0 (clamped), 0.25, 0.75, 1 of the ReLU'd [0, 2]:
    # [0, 0.5, 1.5, 2]. Resizing first would give ReLU([−2, −1, 1, 2]) = [0, 0, 1, 2].
    out = rectified_up(t([[[[-2.0, 2.0]]]]), (1, 4))
    assert torch.allclose(out, t([[[[0.0, 0.5, 1.5, 2.0]]]]))


def test_max_norm_is_authors_min_max() -> None:
    maps = t([[[[1.0, 3.0, -4.0, 2.0]], [[5.0, 5.0, 5.0, 5.0]]]])
    # Channel 0: ReLU → [1, 3, 0, 2], min 0, max 3: ReLU(x − 0 − 1e-5)/(3 + 1e-5). A flat channel becomes 0.
    expected = [[max(x - 1e-5, 0.0) / (3 + 1e-5) for x in (1.0, 3.0, 0.0, 2.0)], [0.0] * 4]
    assert torch.allclose(max_norm(maps)[0, :, 0], t(expected), atol=1e-7)
    # A map whose minimum is positive is shifted: [2, 4] → [0, ≈1].
    shifted = max_norm(t([[[[2.0, 4.0]]]]))[0, 0, 0].tolist()
    assert shifted == pytest.approx([0.0, (2 - 1e-5) / (2 + 1e-5)], abs=1e-7)


def test_peak_norm_is_eq_1() -> None:
    """A = ReLU(F)/max(F) (Eq. 1): [1, 3, −4, 2] → [1/3, 1, 0, 2/3]; a map positive everywhere keeps its floor;
    a map with no positive value is 0."""
    maps = t([[[[1.0, 3.0, -4.0, 2.0]], [[2.0, 4.0, 4.0, 2.0]], [[-1.0, -2.0, -1.0, -3.0]]]])
    expected = [[x / (3 + 1e-5) for x in (1.0, 3.0, 0.0, 2.0)], [x / (4 + 1e-5) for x in (2.0, 4.0, 4.0, 2.0)],
                [0.0] * 4]
    assert torch.allclose(peak_norm(maps)[0, :, 0], t(expected), atol=1e-7)


def test_ssr_label_thresholds_eq_1() -> None:
    """One image, tag 1, feature resolution; class 1's map [2, 4, 1]. Ŷ from Eq. 1's A = [0.5, 1, 0.25]: the
    first two pixels > β_h (0.3) → class 1, the third between β_l (0.15) and β_h → 255 (unsure). The former
    reading (min_max, A ≈ [1/3, 1, 0]) makes the third pixel background: stretching a map that is positive
    everywhere moves its weakest pixels to background."""
    f_a = t([[[[0.0, 0.0, 0.0]], [[2.0, 4.0, 1.0]]]])
    present = torch.tensor([[True]])
    # At the crop's resolution (here the feature map's own size, so the upsampling is the identity) or at the
    # feature map's: the same labels.
    for resolution in ("feature", "input"):
        labels = {}
        for norm in ("max", "min_max"):
            objective = KtseObjective(KtseLossConfig(ce_resolution=resolution, label_norm=norm, ssr_refine="none"))
            labels[norm], _, _ = objective._ssr(f_a, present, anchor_cam(f_a[:, 1:], (1, 3)), torch.zeros(1, 3, 1, 3))
        assert labels["max"].tolist() == [[[1, 1, 255]]], resolution
        assert labels["min_max"].tolist() == [[[1, 1, 0]]], resolution
    assert KtseLossConfig().label_norm == "max"


# --------------------------------------------------------------------------------------------------- SSR


def test_ssr_pseudo_label_thresholds_and_present_classes() -> None:
    # A (N=1, C=2, 1x6): class 1 present, class 2 absent but at 1 everywhere (it never votes).
    cam = t([[[[1.0, 0.5, 0.3, 0.2, 0.15, 0.1]], [[1.0] * 6]]])
    # m > β_h = 0.3 → class 1; m ≤ β_l = 0.15 → 0; in between (0.3 itself included) → 255.
    label = ssr_pseudo_label(cam, torch.tensor([[True, False]]), beta_h=0.3, beta_l=0.15)
    assert label.dtype == torch.long
    assert label.tolist() == [[[1, 1, 255, 255, 0, 0]]]
    # No class present: the whole image is background.
    assert ssr_pseudo_label(cam, torch.zeros(1, 2, dtype=torch.bool), 0.3, 0.15).tolist() == [[[0] * 6]]


def test_ssr_pseudo_label_argmax_of_normalised_cam_over_present_classes() -> None:
    cam = t([[[[0.9, 0.2, 0.5]], [[0.4, 0.8, 0.5]], [[1.0, 1.0, 1.0]]]])
    present = torch.tensor([[True, True, False]])
    # Per pixel argmax of A over classes 1, 2 (absent class 3 excluded); a tie takes the first class.
    assert ssr_pseudo_label(cam, present, 0.3, 0.15).tolist() == [[[1, 2, 1]]]


def _ssr_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Issue 14 §1.4: image A simple (tag 1), image B complex (tags 1, 2); K = 4, two pixels each."""
    features = t([[[[2.0, 0.0]], [[0.0, 3.0]], [[-1.0, 1.0]], [[0.0, 0.0]]],      # a0, a1
                  [[[1.0, 0.0]], [[0.0, 2.0]], [[0.0, 1.5]], [[0.0, -0.3]]]])     # b0, b1
    label = torch.tensor([[[0, 1]], [[0, 2]]])
    present = torch.tensor([[True, False, False], [True, True, False]])
    fg_mask = torch.tensor([[[False, True]], [[False, True]]])
    return features, label, present, fg_mask


def test_ktse_ssr_matches_authors() -> None:
    features, label, present, fg_mask = _ssr_example()
    features.requires_grad_(True)
    z = F.relu(features)
    a0, a1, b0 = [2, 0, 0, 0], [0, 3, 1, 0], [1, 0, 0, 0]
    l_bg = (ce(a0, 0) + ce(b0, 0)) / 2
    l_fg = ce(a1, 1)  # b1 is complex: no foreground CE
    assert (ce(a0, 0), ce(b0, 0), l_bg, l_fg) == pytest.approx((0.3407530, 0.7436684, 0.5422107, 0.2109976),
                                                               abs=1e-7)
    l_ce = ssr_cross_entropy(z, label, present, omega_fg=0.0125)
    assert l_ce.item() == pytest.approx(l_bg + 0.0125 * l_fg, abs=1e-6)
    # L_inter on b1 only: G = ReLU([2, 1.5, −0.3]) → V_2nd − V_max = 1.5 − 2 over |M| + 1e-5.
    l_inter = inter_class_loss(features[:, 1:], present, fg_mask)
    assert l_inter.item() == pytest.approx(-0.5 / (1 + 1e-5), abs=1e-7)
    total = l_ce + 0.005 * l_inter
    assert total.item() == pytest.approx(0.5423482, abs=1e-6)
    (grad,) = torch.autograd.grad(0.005 * l_inter, features)
    # Only the runner-up (channel 2 of b1) is pushed; the detached max and the negative channel get nothing.
    assert grad[1, 2, 0, 1].item() == pytest.approx(0.005 / (1 + 1e-5))
    assert grad[1, 1, 0, 1].item() == 0.0 and grad[1, 3, 0, 1].item() == 0.0
    assert grad.abs().sum().item() == pytest.approx(0.005 / (1 + 1e-5))


def test_ktse_inter_class_loss_floors_once_runner_up_is_negative() -> None:
    # Image B with a third pixel F_fg = [1, −0.5, −1] in M^f: V_2nd = 0, term 0 − 1 = −1, every gradient 0.
    f_fg = t([[[[0.0, 2.0, 1.0]], [[0.0, 1.5, -0.5]], [[0.0, -0.3, -1.0]]]]).requires_grad_(True)
    present = torch.tensor([[True, True, False]])
    loss = inter_class_loss(f_fg, present, torch.tensor([[[False, True, True]]]))
    assert loss.item() == pytest.approx((-0.5 - 1.0) / (2 + 1e-5), abs=1e-7)
    (grad,) = torch.autograd.grad(loss, f_fg)
    assert torch.equal(grad[..., 2], torch.zeros(1, 3, 1))


def test_inter_class_loss_tie_rule() -> None:
    # G = [2, 2, 1]: the authors remove every entry equal to the max, so V_2nd = 1 (a top-2 would give 2).
    f_fg = t([[[[2.0]], [[2.0]], [[1.0]]]])
    present = torch.tensor([[True, True, True]])
    mask = torch.tensor([[[True]]])
    assert inter_class_loss(f_fg, present, mask).item() == pytest.approx(-1 / (1 + 1e-5))
    old = inter_class_loss(f_fg, present, mask, channels="present", detach_max=False, on_relu=False)
    assert old.item() == 0.0


def test_inter_class_loss_former_reading() -> None:
    # Raw features, present channels only, nothing detached: image 0 complex (classes 0, 1), class 2 absent but
    # largest; image 1 simple. Pixels 0, 1 of image 0 in M^f: 1 − 3 = −2 and 1 − 2 = −1.
    f_fg = t([[[[3.0, 1.0, 5.0]], [[1.0, 2.0, 0.0]], [[9.0, 9.0, 9.0]]],
              [[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]])
    present = torch.tensor([[True, True, False], [True, False, False]])
    fg_mask = torch.tensor([[[True, True, False]], [[True, True, True]]])
    old = inter_class_loss(f_fg, present, fg_mask, channels="present", detach_max=False, on_relu=False)
    assert old.item() == pytest.approx(-3 / (2 + 1e-5))
    # The authors' default sees the absent class 2 too: V_max = 9, V_2nd = 3 and 2 → (−6 − 7)/2.
    assert inter_class_loss(f_fg, present, fg_mask).item() == pytest.approx(-13 / (2 + 1e-5))


def test_ssr_cross_entropy_fg_weighting_options() -> None:
    # Pixel 0 labelled background with logits (0, 0, 0); pixel 1 class 1 with (1, 2, 0); pixel 2 ignored.
    features = t([[[[0.0, 1.0, 5.0]], [[0.0, 2.0, -5.0]], [[0.0, 0.0, 3.0]]]])
    label = torch.tensor([[[0, 1, 255]]])
    background, foreground = ce([0, 0, 0], 0), ce([1, 2, 0], 1)
    simple, complex_ = torch.tensor([[True, False]]), torch.tensor([[True, True]])
    # Authors: two means; the foreground CE only on single-tag images.
    assert ssr_cross_entropy(features, label, simple, 0.0125).item() == pytest.approx(
        background + 0.0125 * foreground, rel=1e-6)
    assert ssr_cross_entropy(features, label, complex_, 0.0125).item() == pytest.approx(background, rel=1e-6)
    # Former reading: one mean, ω_fg on multi-tag images' foreground, weight 1 on single-tag ones.
    old = {"omega_fg": 0.0125, "fg_weighting": "discount_complex"}
    assert ssr_cross_entropy(features, label, simple, **old).item() == pytest.approx(
        (background + foreground) / 2, rel=1e-6)
    assert ssr_cross_entropy(features, label, complex_, **old).item() == pytest.approx(
        (background + 0.0125 * foreground) / 2, rel=1e-6)
    # The synthetic branch's CE (authors' get_seg_loss2) counts every image's foreground.
    every = split_cross_entropy(features, label, torch.tensor([True]), 0.0125)
    assert every.item() == pytest.approx(background + 0.0125 * foreground, rel=1e-6)


def test_ssr_discount_complex_on_the_example() -> None:
    features, label, present, _ = _ssr_example()
    z = F.relu(features)
    # One mean over the four labelled pixels; b1 (complex, class 2) weighted ω_fg, a1 (simple) weight 1.
    b1 = relu([0.0, 2.0, 1.5, -0.3])
    expected = (ce([2, 0, 0, 0], 0) + ce([0, 3, 1, 0], 1) + ce([1, 0, 0, 0], 0) + 0.0125 * ce(b1, 2)) / 4
    old = ssr_cross_entropy(z, label, present, 0.0125, "discount_complex")
    assert old.item() == pytest.approx(expected, rel=1e-6)


def test_ssr_cross_entropy_all_ignored_is_zero_with_gradient() -> None:
    features = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = ssr_cross_entropy(features, torch.full((1, 2, 2), 255), torch.tensor([[True, True]]), 0.0125)
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and torch.equal(features.grad, torch.zeros_like(features))


def test_foreground_mask_is_strictly_above_beta_o() -> None:
    assert foreground_mask(t([[[0.5, 0.2, 0.1]]]), 0.2).tolist() == [[[True, False, False]]]


def test_inter_class_loss_without_complex_images_is_zero_with_gradient() -> None:
    f_fg = torch.randn(2, 3, 2, 2, requires_grad=True)
    present = torch.tensor([[True, False, False], [False, False, False]])
    loss = inter_class_loss(f_fg, present, torch.ones(2, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert f_fg.grad is not None and torch.isfinite(f_fg.grad).all() and (f_fg.grad == 0).all()


# --------------------------------------------------------------------------------------------------- SIE


def test_stack_pairs_height_fraction_and_mirror() -> None:
    images = t([[[[1.0, 2.0]]], [[[3.0, 4.0]]], [[[5.0, 6.0]]], [[[7.0, 8.0]]]])  # (4, 1, 1, 2)
    # Half the batch forms pairs (i, i+1), stacked along the height.
    pairs = stack_pairs(images, 2, "height")
    assert pairs.tolist() == [[[[1.0, 2.0], [3.0, 4.0]]], [[[3.0, 4.0], [5.0, 6.0]]]]
    assert stack_pairs(images, 4, "width")[3].tolist() == [[[7.0, 8.0, 1.0, 2.0]]]
    # A batch of one pairs with its own mirror image.
    assert stack_pairs(images[:1], 1, "height").tolist() == [[[[1.0, 2.0], [2.0, 1.0]]]]


def test_ktse_kt_reduction_and_margin() -> None:
    # One pair, C = 3, union tags {1}, two pixels; channels 2, 3 are absent (masked whatever their values).
    reference = t([[[[0.5, 0.2]], [[4.0, 4.0]], [[3.0, 0.0]]]])
    synthetic = t([[[[0.3, 0.25]], [[0.0, 0.0]], [[0.0, 1.0]]]])
    union = torch.tensor([[True, False, False]])
    # Authors: (ReLU(0.5 − 0.3 − 0.05) + ReLU(0.2 − 0.25 − 0.05)) / (3 channels · 2 pixels).
    assert simulated_erasing_loss(reference, synthetic, union).item() == pytest.approx(0.15 / 6)
    # Printed Eq. 3 with our former present-class mean: (0.2 + 0)/2.
    old = simulated_erasing_loss(reference, synthetic, union, margin=0.0, reduction="present")
    assert old.item() == pytest.approx(0.1)


def test_simulated_erasing_loss_present_mean_by_hand() -> None:
    f_a = t([[[[2.0, 1.0], [0.0, 3.0]], [[9.0, 9.0], [9.0, 9.0]]],
             [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]]]])
    f_s = t([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]],
             [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]])
    present = torch.tensor([[True, False], [True, True]])
    old = {"margin": 0.0, "reduction": "present"}
    # image 0, class 0: ReLU([1, 0, −1, 2]) sums to 3 (class 1 absent: its 9s do not count);
    # image 1: class 0 gives 1, class 1 gives 3 → 7 over 3 present channels × 4 pixels.
    assert torch.allclose(simulated_erasing_loss(f_a, f_s, present, **old), torch.tensor(7 / 12))
    assert torch.allclose(simulated_erasing_loss(f_s[:1], f_a[:1], present[:1], **old), torch.tensor(1 / 4))


class _HalfBlindNet(torch.nn.Module):
    """Backbone = identity on 2-channel 'images' (= CAM features, background first); an input taller than
    ``height`` has its lower rows zeroed, so the synthetic image's partner half activates nothing."""

    def __init__(self, height: int) -> None:
        super().__init__()
        self.height = height
        self.backbone = self._features
        self.head = torch.nn.Module()
        self.head.cam_features = lambda x: x
        self.head.pool = lambda f: f[:, 1:].mean((2, 3))
        self.weight = torch.nn.Parameter(torch.ones(()))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.weight
        if x.shape[-2] > self.height:
            x = torch.cat([x[..., : self.height, :], torch.zeros_like(x[..., self.height:, :])], dim=-2)
        return x


def test_ktse_sie_both_halves() -> None:
    images = torch.ones(2, 2, 2, 2)  # both anchors' class-1 CAM is 1 everywhere
    batch = {"image": images, "target": t([[1.0], [1.0]])}
    both = KtseObjective(KtseLossConfig(ssr=False, mga=False, warmup_epochs=0))
    _, terms = both(_HalfBlindNet(2), batch)
    # One pair (half of 2); the partner half: ReLU(1 − 0 − 0.05) on 2x2 of 4x2 pixels.
    assert terms["kt"].item() == pytest.approx(0.95 / 2)
    anchor_only = KtseObjective(KtseLossConfig(ssr=False, mga=False, warmup_epochs=0, sie_both_halves=False))
    assert anchor_only(_HalfBlindNet(2), batch)[1]["kt"].item() == 0.0


def test_alignment_terms_with_no_present_class_are_zero_with_gradient() -> None:
    f_a = torch.randn(1, 2, 2, 2, requires_grad=True)
    f_b = torch.randn(1, 2, 2, 2)
    none = torch.zeros(1, 2, dtype=torch.bool)
    for reduction in ("all_channels", "present"):
        for loss in (simulated_erasing_loss(f_a, f_b, none, reduction=reduction),
                     local_alignment(f_a, f_b, none, reduction=reduction),
                     global_alignment(f_a, f_b, none, reduction=reduction)):
            assert loss.item() == 0.0 and torch.isfinite(loss)
            (grad,) = torch.autograd.grad(loss, f_a)
            assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------------------------------- MGA


def test_erase_keep_mask_by_hand() -> None:
    # Kept where the present-class peak is below 0.6 (authors: cam_fg < 0.6); 0.6 itself is erased.
    keep = erase_keep_mask(t([[[1.0, 0.6], [0.59, 0.0]]]), 0.6)
    assert keep.shape == (1, 1, 2, 2)
    assert keep.tolist() == [[[[False, False], [True, True]]]]


def test_ktse_global_l1_all_channels() -> None:
    f_a = t([[[[0.4]], [[0.6]], [[0.2]]]])  # GAP of one pixel = the pixel
    f_m = t([[[[0.1]], [[0.5]], [[0.0]]]])
    present = torch.tensor([[False, True, False]])
    # Authors: L1 over N·C = 3 entries, absent classes zeroed → 0.1/3; former present-class mean → 0.1.
    assert global_alignment(f_a, f_m, present).item() == pytest.approx(0.1 / 3)
    assert global_alignment(f_a, f_m, present, reduction="present").item() == pytest.approx(0.1)


def test_global_alignment_present_mean_by_hand() -> None:
    f_a = t([[[[1.0, -1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, -2.0]]]])
    f_m = t([[[[0.0, 0.0], [2.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]]])
    # class 0: GAP(ReLU) 4/4 = 1 vs 2/4 = 0.5 → 0.5; class 1: 0 vs 4/4 = 1 → 1.
    both = torch.tensor([[True, True]])
    assert global_alignment(f_a, f_m, both, "present").item() == pytest.approx(0.75)
    assert global_alignment(f_a, f_m, both).item() == pytest.approx(1.5 / 2)


def test_ktse_local_kept_pixels() -> None:
    f_m = t([[[[9.0, 9.0]], [[0.5, 0.3]], [[-4.0, 2.0]]]])  # present class: channel 1
    f_a = t([[[[0.0, 0.0]], [[0.2, 0.4]], [[1.0, 1.0]]]])
    present = torch.tensor([[False, True, False]])
    keep = torch.tensor([[[[True, False]]]])
    # Kept pixel: ReLU(0.5 − 0.2 − 0.05); the erased one: ReLU(0 − 0 − 0.05) = 0; over 3 channels × 2 pixels.
    assert local_alignment(f_m, f_a, present, keep).item() == pytest.approx(0.25 / 6)
    assert local_alignment(f_m, f_a, present, keep, scale=1.3).item() == pytest.approx(0.40 / 6)
    # Former reading: every pixel, no margin, present-class mean: (0.3 + 0)/2.
    old = local_alignment(f_m, f_a, present, None, margin=0.0, reduction="present")
    assert old.item() == pytest.approx(0.15)


# ------------------------------------------------------------------------------------------------ gradcheck


def test_gradcheck_custom_terms() -> None:
    torch.manual_seed(0)
    opts = {"dtype": torch.float64, "requires_grad": True}
    a, b = torch.randn(2, 3, 2, 2, **opts), torch.randn(2, 3, 2, 2, **opts)
    present = torch.tensor([[True, False, True], [True, True, True]])
    keep = torch.tensor([[[[True, False], [True, True]]], [[[False, True], [True, True]]]])
    assert torch.autograd.gradcheck(lambda x, y: simulated_erasing_loss(x, y, present), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: local_alignment(x, y, present, keep), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: global_alignment(x, y, present), (a, b))
    fg_mask = torch.tensor([[[True, False], [True, True]], [[True, True], [False, True]]])
    # The detached V_max is what gradcheck's finite differences cannot see: check the rest of the loss.
    assert torch.autograd.gradcheck(lambda x: inter_class_loss(x, present, fg_mask, detach_max=False), (a,))
    assert torch.autograd.gradcheck(lambda x: inter_class_loss(x, present, fg_mask, channels="present",
                                                               detach_max=False, on_relu=False), (a,))
    label = torch.tensor([[[0, 1], [255, 2]], [[3, 0], [1, 255]]])
    features = torch.randn(2, 4, 2, 2, **opts)
    for weighting in ("simple_only", "discount_complex"):
        assert torch.autograd.gradcheck(lambda x, w=weighting: ssr_cross_entropy(x, label, present, 0.0125, w),
                                        (features,))
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


def _after_warmup(config: KtseLossConfig) -> KtseObjective:
    objective = KtseObjective(config)
    objective.set_epoch(config.warmup_epochs)
    return objective


def test_all_switches_off_is_multilabel_soft_margin() -> None:
    model, batch = _model(), _batch()
    objective = _after_warmup(KtseLossConfig(sie=False, ssr=False, mga=False))
    loss, terms = objective(model, batch)
    expected = F.multilabel_soft_margin_loss(model.head(model.backbone(batch["image"])), batch["target"])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(terms) == {"cls"}


def _count_backbone_calls(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_ktse_warmup() -> None:
    model, batch = _model(), _batch()
    objective = KtseObjective(KtseLossConfig(warmup_epochs=10))
    calls = _count_backbone_calls(model)
    objective.set_epoch(9)
    loss, terms = objective(model, batch)
    expected = F.multilabel_soft_margin_loss(model.head(model.backbone(batch["image"])), batch["target"])
    assert set(terms) == {"cls"} and len(calls) == 2  # one pass in the objective, one for ``expected``
    assert torch.equal(loss, expected)
    calls.clear()
    objective.set_epoch(10)
    _, terms = objective(model, batch)
    assert set(terms) == {"cls", "kt", "ce", "inter", "global", "local"} and len(calls) == 3


def test_full_objective_reaches_backbone() -> None:
    model, batch = _model(), _batch()
    config = KtseLossConfig()
    loss, terms = _after_warmup(config)(model, batch)
    assert set(terms) == {"cls", "kt", "ce", "inter", "global", "local"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) and not v.requires_grad for v in terms.values())
    weighted = sum(v for k, v in terms.items() if k != "inter") + config.lambda_inter * terms["inter"]
    assert torch.allclose(loss.detach(), weighted, atol=1e-6)
    loss.backward()
    grad = model.backbone.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("options", [{}, {"fg_weighting": "discount_complex", "ce_resolution": "feature",
                                          "inter_detach_max": False, "inter_on_relu": False,
                                          "inter_channels": "present", "sie_fraction": 1.0, "sie_concat": "width",
                                          "sie_both_halves": False, "alignment_reduction": "present",
                                          "margin": 0.0, "local_on_kept": False}])
@pytest.mark.parametrize("switches", [{"sie": True, "ssr": False, "mga": False}, {"sie": False, "ssr": True,
                                                                                    "mga": True},
                                      {"sie": True, "ssr": True, "mga": False}])
def test_partial_objective_terms_and_batch_of_one(switches: dict[str, bool], options: dict[str, Any]) -> None:
    model = _model()
    batch = {"image": torch.randn(1, 3, 32, 32), "target": t([[0.0, 1.0, 1.0]])}
    loss, terms = _after_warmup(KtseLossConfig(**switches, **options))(model, batch)
    names = {"cls"} | ({"kt"} if switches["sie"] else set()) | ({"ce", "inter"} if switches["ssr"] else set())
    names |= {"global", "local"} if switches["mga"] else set()
    assert set(terms) == names and torch.isfinite(loss)
    loss.backward()


def test_objective_under_bf16_autocast_returns_float32() -> None:
    model, batch = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = _after_warmup(KtseLossConfig())(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_warmup_must_leave_epochs_for_the_full_objective() -> None:
    with pytest.raises(ValueError, match=r"loss.warmup_epochs \(10\) must be below epochs \(5\)"):
        ClassifierTrainConfig.model_validate({"head": {"name": "ktse"}, "loss": {"name": "ktse"}, "epochs": 5})
    ClassifierTrainConfig.model_validate({"head": {"name": "ktse"}, "loss": {"name": "ktse"}, "epochs": 40})
