"""DeepLab-v2/v3/v3+: shapes, the φ/W interface, parameter groups, atrous rates, the v3+ decoder's low-level
input and state dicts. Tiny resnet_tiny models; expected sizes and values are worked out here by hand."""

from __future__ import annotations

import io
import typing
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core.config_base import BackboneConfig, SegModelConfig
from wsss_ray.models.deeplab import (
    SEG_MODELS,
    DeepLabV2,
    DeepLabV3,
    DeepLabV3Plus,
    SegmentationModel,
    build_segmentation_model,
)
from wsss_ray.models.resnet import ResNet

NAMES = ("deeplab_v2", "deeplab_v3", "deeplab_v3plus")
CLASSES, CHANNELS = 5, 8


def make(name: str, stride: int = 8, seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    config = SegModelConfig(name=name, backbone=BackboneConfig(name="resnet_tiny", output_stride=stride),
                            aspp_channels=CHANNELS)
    return build_segmentation_model(config, CLASSES)


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# Feature-map sizes by hand: the 7x7/2 stem conv (pad 3), the 3x3/2 max-pool (pad 1) and every 3x3/2 stage conv
# (pad 1) map a side n to ceil(n / 2). 64 → 32 → 16 (stride 4) → 8 (stride 8) → 4 (stride 16);
# 65 → 33 → 17 → 9 → 5 and 47 → 24 → 12 → 6 → 3.
FEATURE_SIZES = {(64, 64): {4: (16, 16), 8: (8, 8), 16: (4, 4)},
                 (65, 47): {4: (17, 12), 8: (9, 6), 16: (5, 3)}}


def test_registry_matches_config_and_builds_each_class() -> None:
    names = typing.get_args(SegModelConfig.model_fields["name"].annotation)
    assert set(SEG_MODELS) == set(names) == set(NAMES)
    expected = {"deeplab_v2": DeepLabV2, "deeplab_v3": DeepLabV3, "deeplab_v3plus": DeepLabV3Plus}
    for name in NAMES:
        assert type(make(name)) is expected[name]


def test_forward_features_returns_layer1_and_layer4() -> None:
    torch.manual_seed(0)
    backbone = ResNet("resnet_tiny", 8).eval()
    x = images(1, 64, 64)
    with torch.no_grad():
        features = backbone.forward_features(x)
        # layer1 keeps resnet_tiny's base width 32 at stride 4; layer4 is 8·32 = 256 wide at stride 8.
        assert features["low"].shape == (1, 32, 16, 16) and features["out"].shape == (1, 256, 8, 8)
        assert torch.equal(features["out"], backbone(x))
    assert backbone.low_channels == 32 and backbone.out_channels == 256
    # Bottleneck: layer1 has 64·4 = 256 channels and layer4 512·4 = 2048 (torchvision's resnet50).
    resnet50 = ResNet("resnet50")
    assert (resnet50.low_channels, resnet50.out_channels) == (256, 2048)


@pytest.mark.parametrize("size", [(64, 64), (65, 47)])
@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("name", NAMES)
def test_output_and_feature_shapes(name: str, stride: int, size: tuple[int, int]) -> None:
    model = make(name, stride)  # training mode: N = 2 so BatchNorm on the pooled 1x1 branch has 2 values
    with torch.no_grad():
        out = model(images(2, *size), with_features=True)
        plain = model.eval()(images(1, *size))
    feature_stride = 4 if name == "deeplab_v3plus" else stride
    assert out["logits"].shape == (2, CLASSES, *size)
    assert out["features"].shape == (2, CHANNELS, *FEATURE_SIZES[size][feature_stride])
    assert plain.shape == (1, CLASSES, *size)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(plain).all()


def capture_final_conv(model: SegmentationModel) -> dict[str, torch.Tensor]:
    """Records the final 1x1 conv's output (the logits before upsampling) on every forward."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        seen["low_res"] = output

    model.final_conv.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_logits_are_the_classifier_applied_to_features(name: str) -> None:
    model = make(name).eval()
    seen = capture_final_conv(model)
    weight = model.classifier_weight()
    assert weight.shape == (CLASSES, CHANNELS)
    # Hand-made classifier: W_c = e_c (class c reads feature channel c), b_c = c, so the score of class c at a
    # pixel is φ_c + c there.
    with torch.no_grad():
        model.final_conv.weight.zero_()
        for c in range(CLASSES):
            model.final_conv.weight[c, c] = 1.0
        model.final_conv.bias.copy_(torch.arange(CLASSES, dtype=torch.float32))
        x = images(2, 65, 47)
        out = model(x, with_features=True)
    phi = out["features"]
    expected = torch.stack([phi[:, c] + c for c in range(CLASSES)], dim=1)
    assert torch.allclose(seen["low_res"], expected, atol=1e-6)
    # classifier_weight() is that same W (a view of the parameter, not a copy) ...
    assert torch.equal(model.classifier_weight()[:, :CLASSES], torch.eye(CLASSES))
    assert torch.equal(model.classifier_weight()[:, CLASSES:], torch.zeros(CLASSES, CHANNELS - CLASSES))
    # ... and the returned logits are the stride-h pre-logits upsampled bilinearly to 65 x 47.
    upsampled = F.interpolate(expected, size=(65, 47), mode="bilinear", align_corners=False)
    assert torch.allclose(out["logits"], upsampled, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), out["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_random_classifier_matches_per_pixel_matrix_product(name: str) -> None:
    model = make(name, stride=16).eval()
    seen = capture_final_conv(model)
    with torch.no_grad():
        out = model(images(1, 64, 64), with_features=True)
    weight, bias = model.classifier_weight(), model.final_conv.bias
    manual = torch.einsum("cd,ndhw->nchw", weight, out["features"]) + bias[None, :, None, None]
    assert torch.allclose(seen["low_res"], manual, atol=1e-5)


@pytest.mark.parametrize(("name", "exact_in_training"), [("deeplab_v2", False), ("deeplab_v3", True),
                                                          ("deeplab_v3plus", True)])
def test_training_mode_dropout_sits_only_between_v2_features_and_classifier(name: str,
                                                                             exact_in_training: bool) -> None:
    model = make(name)  # training mode
    seen = capture_final_conv(model)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(images(2, 64, 64), with_features=True)
    manual = torch.einsum("cd,ndhw->nchw", model.classifier_weight(), out["features"])
    manual = manual + model.final_conv.bias[None, :, None, None]
    assert torch.allclose(seen["low_res"], manual, atol=1e-5) is exact_in_training


def test_classifier_weight_is_a_view_that_carries_gradient() -> None:
    model = make("deeplab_v3")
    assert model.classifier_weight().data_ptr() == model.final_conv.weight.data_ptr()
    model.classifier_weight().sum().backward()
    grad = model.final_conv.weight.grad
    assert grad is not None and torch.equal(grad, torch.ones(CLASSES, CHANNELS, 1, 1))


@pytest.mark.parametrize("name", NAMES)
def test_features_path_backpropagates_into_backbone_and_head(name: str) -> None:
    model = make(name)
    out = model(images(2, 32, 32), with_features=True)
    # A loss on φ alone (what LoRM adds) must reach the backbone through forward.
    out["features"].pow(2).mean().backward()
    assert model.backbone.conv1.weight.grad is not None and model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.final_conv.weight.grad is None  # φ is upstream of the classifier


@pytest.mark.parametrize("name", NAMES)
def test_with_features_also_returns_the_backbones_last_map(name: str) -> None:
    # CDSP's LoRM reads the backbone's layer-4 map (the paper's "last layer of the segmentation backbone"); it
    # comes through forward (DDP) and adds no parameter, and the logits are those of the plain call.
    model = make(name).eval()
    before = sum(p.numel() for p in model.parameters())
    x = images(1, 40, 40)
    with torch.no_grad():
        out = model(x, with_features=True)
        assert torch.equal(out["backbone"], model.backbone.forward_features(x)["out"])
        assert torch.equal(out["logits"], model(x))
    assert out["backbone"].shape == (1, model.backbone.out_channels, 5, 5)  # stride 8 of 40
    assert sum(p.numel() for p in model.parameters()) == before


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_partition_all_parameters(name: str) -> None:
    model = make(name)
    backbone, head = model.parameter_groups()
    backbone_ids, head_ids = [id(p) for p in backbone], [id(p) for p in head]
    all_ids = [id(p) for p in model.parameters()]
    assert not set(backbone_ids) & set(head_ids)
    assert sorted(backbone_ids + head_ids) == sorted(all_ids)
    assert len(backbone_ids) + len(head_ids) == len(all_ids)
    assert set(backbone_ids) == {id(p) for p in model.backbone.parameters()}
    assert id(model.final_conv.weight) in head_ids and id(model.final_conv.bias) in head_ids


def dilated_3x3(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
            and m.dilation != (1, 1)]


# v2: 6/12/18/24 at stride 8, halved at 16; at 32 quartered and floored: 1.5 → 1, 3, 4.5 → 4, 6.
@pytest.mark.parametrize(("stride", "rates"), [(8, [6, 12, 18, 24]), (16, [3, 6, 9, 12]), (32, [1, 3, 4, 6])])
def test_v2_branches_use_the_aspp_rates_and_are_all_summed(stride: int, rates: list[int]) -> None:
    model = make("deeplab_v2", stride)
    branches = list(model.classifier.branches)
    assert [b.dilation for b in branches] == [(r, r) for r in rates]
    assert [b.padding for b in branches] == [(r, r) for r in rates]  # same-size outputs, so they can be summed
    assert all(b.kernel_size == (3, 3) and b.out_channels == CHANNELS for b in branches)
    calls: list[int] = []
    for i, branch in enumerate(branches):
        branch.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    with torch.no_grad():
        model.eval()(images(1, 64, 64))
    assert calls == [0, 1, 2, 3]
    # Each branch changes φ: zeroing one branch's weights changes the features.
    with torch.no_grad():
        before = model(images(1, 64, 64), with_features=True)["features"]
        branches[3].weight.zero_()
        after = model(images(1, 64, 64), with_features=True)["features"]
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(("stride", "rates"), [(8, [12, 24, 36]), (16, [6, 12, 18])])
@pytest.mark.parametrize("name", ["deeplab_v3", "deeplab_v3plus"])
def test_v3_aspp_rates(name: str, stride: int, rates: list[int]) -> None:
    convs = dilated_3x3(make(name, stride).classifier)
    assert [c.dilation for c in convs] == [(r, r) for r in rates]


@pytest.mark.parametrize(("name", "uses_low"), [("deeplab_v2", False), ("deeplab_v3", False),
                                                 ("deeplab_v3plus", True)])
def test_only_v3plus_reads_layer1_directly(name: str, uses_low: bool) -> None:
    model = make(name).eval()
    x = images(1, 64, 64)
    with torch.no_grad():
        reference = model(x)
    original: dict[str, torch.Tensor] = {}

    def perturb(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        original["low"] = output
        return output + 1.0  # what forward_features returns as "low"

    def restore(module: nn.Module, inputs: Any) -> tuple[torch.Tensor]:
        return (original["low"],)  # layer2 still sees the unperturbed map: only a skip connection sees +1

    model.backbone.layer1.register_forward_hook(perturb)
    model.backbone.layer2.register_forward_pre_hook(restore)
    with torch.no_grad():
        perturbed = model(x)
    assert "low" in original
    assert (not torch.equal(perturbed, reference)) is uses_low


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    source, target = make(name, seed=0).eval(), make(name, seed=1).eval()
    x = images(1, 40, 56)
    with torch.no_grad():
        assert not torch.equal(source(x), target(x))  # different seeds, different weights
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    result = target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_deeplab_v3_keeps_torchvision_state_dict_names() -> None:
    state = make("deeplab_v3").state_dict()
    assert all(k.startswith(("backbone.", "classifier.")) for k in state)
    backbone_keys = {k.removeprefix("backbone.") for k in state if k.startswith("backbone.")}
    assert backbone_keys == set(ResNet("resnet_tiny", 8).state_dict())
    for key in ["classifier.0.convs.0.0.weight", "classifier.0.convs.1.0.weight", "classifier.0.convs.3.1.running_var",
                "classifier.0.convs.4.1.weight", "classifier.0.project.0.weight", "classifier.1.weight",
                "classifier.2.running_mean", "classifier.4.weight", "classifier.4.bias"]:
        assert key in state, key
    assert state["classifier.4.weight"].shape == (CLASSES, CHANNELS, 1, 1)
    # ASPP: 5 branches (1x1, three atrous, pooling) + the projection, each a conv weight + 5 BN entries (weight,
    # bias, running_mean, running_var, num_batches_tracked) = 6 · 6 = 36; 3x3 conv 1; BN 5; final conv 2 → 44.
    assert sum(k.startswith("classifier.") for k in state) == 44


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward(name: str) -> None:
    model = make(name).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(1, 33, 31), with_features=True)
    assert out["logits"].shape == (1, CLASSES, 33, 31)
    assert torch.isfinite(out["logits"].float()).all() and torch.isfinite(out["features"].float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_cosine_head_is_scaled_cosine_of_phi_and_w(name: str) -> None:
    # BANA footnote 4 / stage3_vgg.py: logits_c(p) = τ·⟨φ(p)/‖φ(p)‖, W_c/‖W_c‖⟩, no bias, τ = 20.
    torch.manual_seed(0)
    config = SegModelConfig(name=name, backbone=BackboneConfig(name="resnet_tiny", output_stride=16),
                            aspp_channels=CHANNELS, classifier="cosine")
    model = build_segmentation_model(config, CLASSES).eval()
    assert model.final_conv.bias is None and model.cosine_scale == 20.0
    assert float(model.final_conv.weight.detach().std()) == pytest.approx(0.01, rel=0.5)  # N(0, 0.01²) init
    phi = model(images(1, 64, 64), with_features=True)["features"][0].detach().numpy()
    weight = model.classifier_weight().detach().numpy()
    assert weight.shape == (CLASSES, CHANNELS)  # the W the cosine uses, for NAL's σ
    low_res = model.classify(torch.from_numpy(phi)[None])[0].detach().numpy()
    for i, j in [(0, 0), (1, 2), (3, 3)]:
        f = phi[:, i, j]
        for c in range(CLASSES):
            w = weight[c]
            expected = 20.0 * float((f * w).sum()) / (max(float((f * f).sum()) ** 0.5, 1e-12)
                                                      * max(float((w * w).sum()) ** 0.5, 1e-12))
            assert low_res[c, i, j] == pytest.approx(expected, abs=1e-4)
    # A conv model built from the same seed is unchanged by the option's existence (same initial weights).
    torch.manual_seed(0)
    plain = build_segmentation_model(config.model_copy(update={"classifier": "conv"}), CLASSES)
    assert plain.cosine_scale is None and plain.final_conv.bias is not None
    assert torch.equal(make(name, stride=16).backbone.conv1.weight, plain.backbone.conv1.weight)
