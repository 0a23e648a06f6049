"""Dilated ResNets whose parameter names match torchvision's, without importing torchvision.

torchvision does not import with the CPU torch build these machines have, so the architecture is written out
here; names (``conv1``, ``layer3.0.downsample.0`` …) follow torchvision exactly so that an ImageNet checkpoint from
torchvision or timm loads with ``strict=True``. Output stride 8/16 replaces the last strides by dilation, as
torchvision's ``replace_stride_with_dilation`` and DeepLab do.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from wsss_ray.core import storage


def _conv3x3(inp: int, out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# name -> (block, layers, base width). ``resnet_tiny`` is for CPU tests and the generated dataset.
ARCHITECTURES: dict[str, tuple[type[nn.Module], list[int], int]] = {
    "resnet_tiny": (BasicBlock, [1, 1, 1, 1], 32),
    "resnet18": (BasicBlock, [2, 2, 2, 2], 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 64),
}


class ResNet(nn.Module):
    """ResNet trunk (no ``fc``) returning the stride-``output_stride`` feature map of ``layer4``.

    ``forward_features`` also returns ``layer1``'s stride-4 map, the low-level input of DeepLab-v3+'s decoder.
    ``low_channels`` / ``out_channels`` are those two maps' channel counts.
    """

    def __init__(self, name: str, output_stride: int = 16) -> None:
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(ARCHITECTURES)}")
        block, layers, width = ARCHITECTURES[name]
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, dilate[2])
        self.low_channels: int = width * block.expansion  # type: ignore[attr-defined]
        self.out_channels: int = width * 8 * block.expansion  # type: ignore[attr-defined]
        self.output_stride = output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"low": layer1 output (N, low_channels, ~H/4, ~W/4), "out": layer4 output (stride output_stride)}``.

        The stem (stride-2 conv + stride-2 max-pool) makes ``layer1`` stride 4 whatever the output stride; each
        stride-2 stage rounds odd sizes up (a 65-pixel side gives 33, 17, 9, ...).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return {"low": low, "out": self.layer4(self.layer3(self.layer2(low)))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` feature map (N, out_channels, h, w) at stride ``output_stride``."""
        return self.forward_features(x)["out"]


NO_WEIGHTS = "none"  # ``weights: none``: train from scratch, said on purpose (see wsss_ray.preflight.weights)


def backbone_state(raw: object, uri: str) -> dict[str, torch.Tensor]:
    """The ResNet tensors of a loaded checkpoint: a state dict or ``{"state_dict": ...}``, torchvision or timm
    naming, DDP's ``module.`` prefix dropped, the ImageNet classifier (``fc.*``) left out."""
    if isinstance(raw, dict) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{uri}: not a state dict (a mapping of parameter names to tensors), got "
                         f"{type(raw).__name__}")
    return {k.removeprefix("module."): v for k, v in raw.items() if not k.startswith(("fc.", "module.fc."))}


def load_backbone_weights(model: ResNet, uri: str) -> None:
    """Load an ImageNet ResNet state dict (torchvision or timm naming) strictly; ``fc.*`` is dropped."""
    raw = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    state = backbone_state(raw, uri)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{uri}: backbone weights do not match {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}{'…' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'…' if len(result.unexpected_keys) > 5 else ''}"
        )


def build_backbone(name: str, output_stride: int = 16, weights: str | None = None) -> ResNet:
    """A ResNet, with the ImageNet ``weights`` at that URI loaded; None, "" or ``none``: from scratch."""
    model = ResNet(name, output_stride)
    if weights and weights.strip().lower() != NO_WEIGHTS:
        load_backbone_weights(model, weights)
    return model
