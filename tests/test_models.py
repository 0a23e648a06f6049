"""Backbones, heads, losses, CAMs and augmentation: small tensors, expected values worked out here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_ray.core.config_base import BackboneConfig, SegModelConfig
from wsss_ray.data.transforms import random_scale_crop_flip
from wsss_ray.maths.inference import multiscale_cams, normalize
from wsss_ray.methods.cam.config import MultiLabelSoftMarginConfig
from wsss_ray.methods.cam.objective import multilabel_soft_margin
from wsss_ray.methods.registry import build_classifier
from wsss_ray.methods.robust.config import CrossEntropyConfig
from wsss_ray.methods.robust.losses import cross_entropy
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.resnet import ResNet, build_backbone
from wsss_ray.pipeline_config import ClassifierTrainConfig
from wsss_ray.training.ingest import steps_per_epoch
from wsss_ray.training.optim import set_poly_lr


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "torchvision_total"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_backbone_matches_torchvision_parameter_count(name: str, torchvision_total: int) -> None:
    # torchvision's published totals include the 1000-way fc layer, which a backbone drops.
    fc = 512 * 1000 + 1000 if name == "resnet18" else 2048 * 1000 + 1000
    assert count(ResNet(name)) == torchvision_total - fc


def test_torchvision_style_checkpoint_loads_strictly(tmp_path: Path) -> None:
    source = ResNet("resnet18")
    state = {**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    assert "layer2.0.downsample.0.weight" in state and "layer4.1.bn2.running_var" in state
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded = build_backbone("resnet18", 16, str(path))
    assert torch.equal(loaded.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match=rf"{path}: backbone weights do not match.*missing"):
        build_backbone("resnet18", 16, str(path))


@pytest.mark.parametrize(("stride", "expected"), [(8, 16), (16, 8), (32, 4)])
def test_output_stride_by_dilation(stride: int, expected: int) -> None:
    out = ResNet("resnet_tiny", stride)(torch.zeros(1, 3, 128, 128))
    assert out.shape[-2:] == (expected, expected)


def test_classifier_and_deeplab_shapes() -> None:
    cls = build_classifier(ClassifierTrainConfig(backbone=BackboneConfig(name="resnet_tiny")), num_foreground=20)
    x = torch.randn(2, 3, 64, 64)
    assert cls(x).shape == (2, 20)
    cams = cls.cams(x)
    assert cams.shape == (2, 20, 4, 4) and (cams >= 0).all()
    seg = build_segmentation_model(SegModelConfig(backbone=BackboneConfig(name="resnet_tiny", output_stride=8),
                                                  aspp_channels=16), 21)
    assert seg(x).shape == (2, 21, 64, 64)


def test_gap_logits_equal_mean_of_linear_cams() -> None:
    # GAP then 1x1 conv == 1x1 conv then GAP: the image logit is the mean of the (pre-ReLU) CAM.
    cls = build_classifier(ClassifierTrainConfig(backbone=BackboneConfig(name="resnet_tiny")), num_foreground=3)
    features = torch.randn(1, cls.backbone.out_channels, 5, 5)
    linear_cam = cls.head.classifier(features)
    assert torch.allclose(cls.head(features), linear_cam.mean((2, 3)), atol=1e-5)


def test_multilabel_soft_margin_by_hand() -> None:
    logits, target = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    # class 0: -log σ(0) = log 2; class 1 (negative): -log(1 - σ(2)) = log(1 + e^2); mean over classes.
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert multilabel_soft_margin(MultiLabelSoftMarginConfig())(logits, target).item() == pytest.approx(expected)


def test_cross_entropy_ignores_255_and_smooths() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # N=1, C=2, H=1, W=2
    target = torch.tensor([[[0, 255]]])
    # only pixel 0 counts: -log softmax([2, 0])[0] = log(1 + e^-2)
    ce = cross_entropy(CrossEntropyConfig())(logits, target)
    assert ce.item() == pytest.approx(math.log(1 + math.exp(-2)))
    # smoothing ε=0.2 over C=2: target (0.9, 0.1) → 0.9·log(1+e^-2) + 0.1·(2 + log(1+e^-2))
    smoothed = cross_entropy(CrossEntropyConfig(label_smoothing=0.2))(logits, target)
    assert smoothed.item() == pytest.approx(math.log(1 + math.exp(-2)) + 0.1 * 2)
    all_ignored = cross_entropy(CrossEntropyConfig())(logits.requires_grad_(), torch.full((1, 1, 2), 255))
    assert all_ignored.item() == 0.0
    all_ignored.backward()


def test_multiscale_cams_are_normalised_and_flip_consistent() -> None:
    torch.manual_seed(0)
    cls = build_classifier(ClassifierTrainConfig(backbone=BackboneConfig(name="resnet_tiny")), num_foreground=4).eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    cams = multiscale_cams(cls, image, [2, 4], scales=(1.0, 0.5), flip=True)
    assert cams.shape == (2, 40, 56) and cams.dtype == np.float32
    assert np.allclose(cams.reshape(2, -1).max(1), 1.0, atol=1e-4) and cams.min() >= 0
    # With flip the CAM of the mirrored image is the mirrored CAM.
    mirrored = multiscale_cams(cls, image[:, ::-1], [2, 4], scales=(1.0, 0.5), flip=True)
    assert np.allclose(mirrored, cams[:, :, ::-1], atol=1e-4)
    assert multiscale_cams(cls, image, []).shape == (0, 40, 56)


def test_random_scale_crop_flip_keeps_image_and_label_aligned() -> None:
    rng = np.random.default_rng(0)
    label = np.zeros((30, 40), np.uint8)
    label[5:15, 10:30] = 3
    image = np.stack([label * 50] * 3, -1).astype(np.uint8)
    for _ in range(20):
        img, lbl = random_scale_crop_flip(image, label, 48, (0.5, 1.5), True, rng)
        assert img.shape == (48, 48, 3) and lbl.shape == (48, 48)
        inside = lbl != 255
        # every labelled pixel's colour still says its class (nearest-neighbour label, bilinear image)
        core = (lbl == 3) & inside
        assert (img[..., 0][core] >= 60).mean() > 0.95
        assert ((lbl == 255) == (img.sum(-1) == 0))[lbl == 255].all()


def test_normalize_and_poly_schedule_and_batching() -> None:
    x = normalize(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 2, 2)
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    optimizer.param_groups[0]["initial_lr"] = 0.1
    assert set_poly_lr(optimizer, 50, 100, 0.9) == pytest.approx(0.1 * 0.5**0.9)
    assert set_poly_lr(optimizer, 100, 100, 0.9) == 0.0
    assert steps_per_epoch(100, 16, 2) == (8, 6)  # the global batch of 16: 8 per worker, 100 // 16 steps
