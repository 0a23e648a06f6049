"""Defaults that follow the papers, or the authors' code where a paper is silent (issue 23): KTSE's PAR-refined Ŷ,
its normalisation order and Eq. 4's argmax, its GPP pyramid, and BANA's Y_ret fallback. Expected values are
worked out here per pixel in plain Python (the formula written out), never by calling the implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_ray.core.config_base import BackboneConfig, ParConfig, key_dump
from wsss_ray.maths.inference import image_tensor
from wsss_ray.methods.bana.boxes import retrieval_prototypes, retrieve
from wsss_ray.methods.bana.config import BapHeadConfig, BoxGeneratorConfig
from wsss_ray.methods.bana.head import BapHead
from wsss_ray.methods.ktse.config import KtseHeadConfig, KtseLossConfig
from wsss_ray.methods.ktse.head import KtseHead
from wsss_ray.methods.ktse.objective import KtseObjective
from wsss_ray.methods.ktse.ssr import anchor_cam, par_pseudo_label
from wsss_ray.methods.registry import build_classifier, build_generator
from wsss_ray.pipeline_config import ClassifierTrainConfig

OFFSETS_DX = [-1, 0, 1, -1, 1, -1, 0, 1]  # AFA's 8 neighbours at dilation 1: their column offsets
DIAGONAL = [True, False, True, False, False, True, False, True]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def flat_image_weights() -> list[float]:
    """PAR's affinity on a flat image: colour softmax 1/8 each, plus 0.01 × the position softmax (w1 = 0.3)."""
    distances = [math.sqrt(2.0) if d else 1.0 for d in DIAGONAL]
    mean = sum(distances) / 8
    spread = math.sqrt(sum((d - mean) ** 2 for d in distances) / 7)
    kernel = [-((d / (spread + 1e-8) / 0.3) ** 2) for d in distances]
    exps = [math.exp(k - max(kernel)) for k in kernel]
    return [1 / 8 + 0.01 * e / sum(exps) for e in exps]


def hand_par_label(a: list[float], beta: float) -> list[int]:
    """One PAR step on a 1×W strip of softmax([β, A]) (flat image, dilation 1, replicated border), then argmax:
    1 where the refined class share beats the refined background share."""
    weights, width = flat_image_weights(), len(a)
    fg = [sigmoid(v - beta) for v in a]  # softmax over [β, A]: the class's share
    labels = []
    for j in range(width):
        near = [min(max(j + dx, 0), width - 1) for dx in OFFSETS_DX]
        refined_fg = sum(w * fg[q] for w, q in zip(weights, near, strict=True))
        refined_bg = sum(w * (1 - fg[q]) for w, q in zip(weights, near, strict=True))
        labels.append(1 if refined_fg > refined_bg else 0)
    return labels


def test_ktse_pseudo_label_is_refined_with_par_by_hand() -> None:
    """A = [1.0, 0.2, 0.1] for the one present class, β_h = 0.3, β_l = 0.15. Thresholded (no PAR):
    [1, 255, 0]. With PAR the strong first pixel pulls its neighbour up: at β_h the middle pixel's refined class
    share is ≈ 0.543 against 0.467 for background, so Ŷ = [1, 1, 0] (the last pixel stays background at β_l too:
    ≈ 0.502 against 0.508)."""
    a = [1.0, 0.2, 0.1]
    high, low = hand_par_label(a, 0.3), hand_par_label(a, 0.15)
    expected = [h if h != 0 else (0 if lo == 0 else 255) for h, lo in zip(high, low, strict=True)]
    assert expected == [1, 1, 0]
    cam = torch.tensor([[[a]]])
    present = torch.tensor([[True]])
    par = ParConfig(iterations=1, dilations=[1], downscale=1)
    label = par_pseudo_label(cam, present, torch.zeros(1, 3, 1, 3), 0.3, 0.15, par)
    assert label.tolist() == [[expected]]
    # Through the objective (its default refines with PAR), at the crop's resolution.
    assert KtseLossConfig().ssr_refine == "par" and KtseLossConfig().par == ParConfig()
    f_a = torch.tensor([[[[0.0, 0.0, 0.0]], [a]]])  # max 1: A = F/(1 + 1e-5), the same labels
    objective = KtseObjective(KtseLossConfig(par=par))
    label, _, _ = objective._ssr(f_a, present, anchor_cam(f_a[:, 1:], (1, 3)), torch.zeros(1, 3, 1, 3))
    assert label.tolist() == [[expected]]
    none = KtseObjective(KtseLossConfig(ssr_refine="none"))
    assert none._ssr(f_a, present, anchor_cam(f_a[:, 1:], (1, 3)), torch.zeros(1, 3, 1, 3))[0].tolist() \
        == [[[1, 255, 0]]]


def test_ktse_par_label_absent_classes_never_win_and_batches_agree() -> None:
    torch.manual_seed(0)
    cam = torch.rand(3, 4, 8, 6)
    present = torch.tensor([[True, False, False, True], [False, False, False, False], [False, True, False, False]])
    images = torch.rand(3, 3, 8, 6)
    label = par_pseudo_label(cam, present, images, 0.3, 0.15, ParConfig(iterations=3))
    assert set(label[0].unique().tolist()) <= {0, 1, 4, 255}
    assert (label[1] == 0).all()  # no tag: all background
    assert set(label[2].unique().tolist()) <= {0, 2, 255}
    # Each image alone (the authors loop over images) gives its row of the batched result.
    for n in range(3):
        alone = par_pseudo_label(cam[n:n + 1], present[n:n + 1], images[n:n + 1], 0.3, 0.15, ParConfig(iterations=3))
        assert torch.equal(alone[0], label[n])


def test_ktse_label_normalised_at_feature_resolution_then_upsampled() -> None:
    """F = [1, 4, 1] (1×3) on a 1×6 crop. Authors: A = up(F / max F) = up([0.25, 1, 0.25]) = [0.25, 0.4375,
    0.8125, 0.8125, 0.4375, 0.25] (bilinear, align_corners=False: source x = (x + 0.5)/2 − 0.5). Our earlier
    order: up(F) = [1, 1.75, 3.25, 3.25, 1.75, 1], divided by its own max 3.25: the ends 0.3077 > β_h."""
    f_a = torch.tensor([[[[0.0, 0.0, 0.0]], [[1.0, 4.0, 1.0]]]])
    present, images = torch.tensor([[True]]), torch.zeros(1, 3, 1, 6)
    labels = {}
    for order in ("feature", "input"):
        objective = KtseObjective(KtseLossConfig(label_norm_at=order, ssr_refine="none"))
        labels[order] = objective._ssr(f_a, present, anchor_cam(f_a[:, 1:], (1, 6)), images)[0].tolist()
    up_then_norm = [v / 3.25 for v in (1, 1.75, 3.25, 3.25, 1.75, 1)]
    norm_then_up = [0.25, 0.4375, 0.8125, 0.8125, 0.4375, 0.25]

    def threshold(values: list[float]) -> list[int]:
        return [1 if v > 0.3 else (0 if v <= 0.15 else 255) for v in values]

    assert labels["feature"] == [[threshold(norm_then_up)]] == [[[255, 1, 1, 1, 1, 255]]]
    assert labels["input"] == [[threshold(up_then_norm)]] == [[[1] * 6]]
    assert KtseLossConfig().label_norm_at == "feature"


def test_ktse_eq4_argmax_is_over_the_normalised_cam() -> None:
    """Two present classes: F_1 = [8, 10], F_2 = [3, 2] → A_1 = [0.8, 1], A_2 = [1, 0.667]. The argmax of A
    (the authors' code) gives [2, 1]; the argmax of F would give [1, 1]."""
    f_a = torch.tensor([[[[0.0, 0.0]], [[8.0, 10.0]], [[3.0, 2.0]]]])
    present = torch.tensor([[True, True]])
    objective = KtseObjective(KtseLossConfig(ce_resolution="feature", ssr_refine="none"))
    label, _, _ = objective._ssr(f_a, present, anchor_cam(f_a[:, 1:], (1, 2)), torch.zeros(1, 3, 1, 2))
    assert label.tolist() == [[[2, 1]]]


def test_ktse_new_options_keep_earlier_keys_at_their_earlier_values() -> None:
    earlier = KtseLossConfig(label_norm_at="input", ssr_refine="none")
    assert not {"label_norm_at", "ssr_refine", "par"} & set(key_dump(earlier))
    assert {"label_norm_at", "ssr_refine"} <= set(key_dump(KtseLossConfig()))


def test_gpp_pyramid_is_the_codes_2_4_8_16_and_levels_beyond_the_map_return_f() -> None:
    """cam2logit: gates 2→4, →8, →16. On a 2x2 map every level (2, 4, 8, 16) pools back to F itself; with
    every gate at σ(0) = 1/2, g(x, y) = (x + y)/4 for maps of one sign per pixel: G = F/2, then (F/2 + F)/4 =
    3F/8, then (3F/8 + F)/4 = 11F/32. q = mean(ReLU(F)·ReLU(G)) − mean(ReLU(−F)·ReLU(−G)) = 11/32·mean(F·|F|)
    = 11/32·(1 − 4 + 9 + 0)/4 = 0.515625 for F = [[1, −2], [3, 0]]."""
    assert KtseHeadConfig().pyramid == [2, 4, 8, 16]
    head = KtseHead(1, 1, KtseHeadConfig())
    assert len(head.gates) == 3
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[[[0.5]]], [[[1.0]]]]))
        for gate in head.gates:
            gate.positive.weight.zero_()
            gate.negative.weight.zero_()
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    for level in head.pyramid_maps(head.cam_features(x)[:, 1:]):
        assert torch.allclose(level, x, atol=1e-6)
    assert head(x).item() == pytest.approx(11 / 32 * 1.5, abs=1e-6)


def test_bana_y_ret_falls_back_to_the_classifier_weight_by_hand() -> None:
    """BANA stage2.py: a class of [background, tags] with no pixel in Y_crf takes the classifier's normalised
    w_c as its Y_ret prototype. Features of a 1x2 map: cell 0 = (1, 0), cell 1 = (0, 1); Y_crf labels cell 0
    background and leaves cell 1 unlabelled, so tag 3 has no pixel and its prototype is w_3 = (0, 5)."""
    features = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)  # (C=2, h=1, w=2): cell 0 (1, 0), cell 1 (0, 1)
    y_crf = np.zeros((1, 2), np.uint8)
    y_crf[0, 1] = 255  # cell 1 unlabelled: background's prototype is cell 0's feature (1, 0)
    weights = np.array([[9.0, 9.0], [0.0, 5.0]], np.float32)  # rows of [background, tag 3]
    protos = retrieval_prototypes(features, y_crf, [0, 3], weights)
    # Background has a pixel: its own mean (1, 0), not w_0. Tag 3 has none: w_3 = (0, 5).
    assert protos[0].tolist() == [1.0, 0.0] and protos[3].tolist() == [0.0, 5.0]
    # Cell 0: cos (1, 0)·(1, 0) = 1 vs (1, 0)·(0, 1) = 0 → 0; cell 1: 0 vs 1 → 3.
    assert retrieve(features, protos, (1, 2)).tolist() == [[0, 3]]
    # Our earlier reading: tag 3 has no prototype and can never appear.
    assert retrieve(features, retrieval_prototypes(features, y_crf, [0, 3]), (1, 2)).tolist() == [[0, 0]]
    assert BoxGeneratorConfig().ret_fallback == "classifier"
    assert "ret_fallback" not in key_dump(BoxGeneratorConfig(ret_fallback="drop"))


def test_box_generator_hands_the_bap_classifier_rows_to_y_ret() -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierTrainConfig(backbone=BackboneConfig(name="resnet_tiny")), num_foreground=3)
    model.head = BapHead(model.backbone.out_channels, 3, BapHeadConfig())
    model.eval()
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    record = {"boxes": [[2, 4, 4, 20, 20]]}
    arrays = build_generator(BoxGeneratorConfig()).model_step(model, image, record, [2], "cpu")
    assert np.allclose(arrays["class_weights"], model.head.weight.detach()[[0, 2]].numpy())
    # The in-box unaries' CAM follows the linear classifier (Eq. 6): ReLU(f·w_2) upsampled to the image
    # (single scale, no flip: the generator's defaults), over its maximum.
    with torch.no_grad():
        features = model.backbone(image_tensor(image))[0]
        raw = torch.relu(torch.einsum("d,dhw->hw", model.head.weight[2], features))
        up = torch.nn.functional.interpolate(raw[None, None], size=(32, 32), mode="bilinear", align_corners=False)
    assert up.max() > 1e-3  # a CAM with activation, so the comparison means something
    assert np.allclose(arrays["cams"][0], (up[0, 0] / up.max()).numpy(), atol=1e-5)
    dropped = build_generator(BoxGeneratorConfig(ret_fallback="drop")).model_step(model, image, record, [2], "cpu")
    assert "class_weights" not in dropped
