"""Class activation maps: multi-scale + flip inference with a CAM classifier (IRN's ``make_cam`` step).

For every scale the image is resized, passed through the classifier together with its mirror image, the
mirrored CAM is flipped back, and all CAMs are upsampled to the image size and summed; each class map is then
divided by its maximum, so CAMs lie in [0, 1] and a single background score can be compared against them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss_ray.data.transforms import normalize


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
    x = normalize(torch.from_numpy(np.ascontiguousarray(image))[None].to(device))
    total = torch.zeros((len(labels), h, w), device=device)
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else x
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        cams = model.cams(xs)[:, channels]
        if flip:
            cams = cams[0:1] + cams[1:2].flip(-1)
        total += F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)[0]
    peak = total.flatten(1).max(dim=1).values.clamp_min(1e-5)
    return (total / peak[:, None, None]).cpu().numpy().astype(np.float32)
