"""Multi-scale + flip inference: the one forward pass behind CAMs (IRN's ``make_cam``), MSPN's seeds and the
segmenter's evaluation.

For every scale the image is resized, passed through ``forward`` together with its mirror image, the mirrored
map is flipped back and added, and the maps are upsampled to the image size and summed. Callers then normalise:
CAMs by each class map's maximum (so CAMs lie in [0, 1] and one background score can be compared against them),
class probabilities by their sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics: every backbone here takes ImageNet-normalised RGB (torchvision's ResNet weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Forward = Callable[[torch.Tensor], torch.Tensor]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×3 (as stored by Ray Data) → float N×3×H×W with ImageNet mean/std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def image_tensor(image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """One H×W×3 uint8 image as a normalised 1×3×H×W float tensor on ``device``."""
    return normalize(torch.from_numpy(np.ascontiguousarray(image))[None].to(device))


def multiscale_forward(forward: Forward, image: np.ndarray, scales: Sequence[float], flip: bool,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """``forward`` maps (N×C×h×w for an N×3×h'×w' batch) summed over ``scales`` and mirror images → C×H×W.

    A scale resizes to ``round(H·scale) × round(W·scale)``; with ``flip`` the batch holds the image and its mirror,
    and ``forward`` sees both at once (so e.g. MSPN's dropout draws one mask over both).
    """
    h, w = image.shape[:2]
    x = image_tensor(image, device)
    total: torch.Tensor | None = None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        maps = forward(xs)
        if flip:
            maps = maps[0:1] + maps[1:2].flip(-1)
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[0]
        total = maps if total is None else total + maps
    if total is None:
        raise ValueError("scales must not be empty")
    return total


def max_normalised(cams: torch.Tensor) -> np.ndarray:
    """K×H×W CAMs divided by each map's maximum (a class with no activation stays zero) as float32 numpy."""
    peak = cams.flatten(1).max(dim=1).values.clamp_min(1e-5)
    return (cams / peak[:, None, None]).float().cpu().numpy()


@torch.no_grad()
def multiscale_cams(
    model: torch.nn.Module,
    image: np.ndarray,
    labels: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """CAMs of the foreground classes ``labels`` (1-based class ids) for one H×W×3 uint8 image.

    Returns a float32 array (K, H, W) in [0, 1], K = len(labels); a class with no activation is all zeros.
    """
    h, w = image.shape[:2]
    if len(labels) == 0:
        return np.zeros((0, h, w), np.float32)
    channels = torch.as_tensor([label - 1 for label in labels], device=device)
    return max_normalised(multiscale_forward(lambda xs: model.cams(xs)[:, channels], image, scales, flip, device))


@torch.no_grad()
def multiscale_probabilities(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float], flip: bool,
                             device: str | torch.device = "cpu") -> np.ndarray:
    """A segmenter's class probabilities (C, H, W) averaged over scales and horizontal flips."""
    total = multiscale_forward(lambda xs: model(xs).softmax(1), image, scales, flip, device)
    return (total / total.sum(0, keepdim=True)).cpu().numpy()
