"""Pixel-adaptive refinement (PAR) of score maps, in pure torch (any device, batched).

PAR (AFA, Ru et al. CVPR 2022; reused by ToCo and by KTSE's ``refine_cams_with_bkg_v2``) is a fast,
DenseCRF-like smoothing: each pixel's scores become a weighted sum of its neighbours' scores, repeated a few
times, with weights from the image. Our transcription of AFA's released ``PAR`` (KTSE imports the same module):

* neighbours: for every dilation d the 8 pixels at offsets (±d or 0, ±d or 0) except (0, 0), in the order
  (−d,−d), (−d,0), (−d,+d), (0,−d), (0,+d), (+d,−d), (+d,0), (+d,+d); the border is replicated. K = 8·len(d).
* colour kernel: per channel ``−(|I(q) − I(p)| / (σ_p + 1e−8) / w1)²`` with σ_p the (unbiased) standard
  deviation of the K neighbour colours I(q) of pixel p in that channel; averaged over channels, then a softmax
  over the K neighbours.
* position kernel: the same with the neighbour's distance (d, or √2·d on a diagonal) in place of the colour
  difference, its standard deviation taken over all K distances; a softmax over the K neighbours.
* affinity ``a = softmax(colour) + w2·softmax(position)``; each iteration ``S(p) ← Σ_q a(p, q)·S(q)``.

The affinities sum to 1 + w2 per pixel, so every iteration scales all scores by that factor; an argmax does not
notice, and :func:`par_refine` leaves the scale as AFA does (callers normalise if they need probabilities).
Scaling a colour channel by a constant or shifting it leaves the colour kernel unchanged, so an
ImageNet-normalised image, an RGB image in [0, 1] and one in [0, 255] give the same affinities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss_ray.core.config_base import ParConfig
from wsss_ray.maths.crf import cams_to_mask

__all__ = ["dilated_neighbours", "par_affinity", "par_at_scale", "par_refine", "refine_cams_par"]

_STD_EPS = 1e-8


def _offsets(dilations: list[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the K neighbours, in AFA's order: per dilation, row-major around the pixel."""
    unit = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in unit]


def dilated_neighbours(x: torch.Tensor, dilations: list[int]) -> torch.Tensor:
    """``(N, C, K, H, W)``: for every pixel of ``x`` ``(N, C, H, W)`` its K = 8·len(dilations) neighbours, the
    border replicated (a neighbour outside the map is the nearest border pixel)."""
    _, _, h, w = x.shape
    reach = max(dilations)
    padded = F.pad(x, [reach] * 4, mode="replicate")
    return torch.stack([padded[..., reach + dy:reach + dy + h, reach + dx:reach + dx + w]
                        for dy, dx in _offsets(dilations)], dim=2)


def _kernel(distance: torch.Tensor, spread: torch.Tensor, temperature: float) -> torch.Tensor:
    """``−(distance / (σ + 1e−8) / w1)²`` for a spread σ (a standard deviation over the neighbours)."""
    return -((distance / (spread + _STD_EPS) / temperature) ** 2)


def par_affinity(image: torch.Tensor, config: ParConfig) -> torch.Tensor:
    """PAR's affinity ``(N, 1, K, H, W)`` of an image ``(N, 3, H, W)``: softmax over the K neighbours of the
    channel-averaged colour kernel, plus ``position_weight`` times the softmax of the position kernel."""
    image = image.float() if image.dtype != torch.float64 else image
    neighbours = dilated_neighbours(image, config.dilations)
    # σ_p: the spread of the neighbours' colours themselves (not of their differences to I(p)), unbiased.
    colour = _kernel((neighbours - image[:, :, None]).abs(), neighbours.std(dim=2, keepdim=True),
                     config.temperature).mean(dim=1, keepdim=True)
    unit = [math.sqrt(2.0) if dy and dx else 1.0 for dy, dx in _offsets([1])]
    distance = torch.tensor([u * d for d in config.dilations for u in unit], dtype=image.dtype,
                            device=image.device).view(1, 1, -1, 1, 1)
    position = _kernel(distance, distance.std(dim=2, keepdim=True), config.temperature)
    return colour.softmax(dim=2) + config.position_weight * position.softmax(dim=2)


def par_refine(image: torch.Tensor, scores: torch.Tensor, config: ParConfig) -> torch.Tensor:
    """``config.iterations`` PAR steps of ``scores`` ``(N, L, h, w)`` over ``image`` ``(N, 3, H, W)``: the scores
    are first resized to the image's size (bilinear, align_corners=True, as AFA), the result is ``(N, L, H, W)``.
    No gradient flows (PAR refines pseudo-labels)."""
    with torch.no_grad():
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (N, 3, H, W), got {tuple(image.shape)}")
        if scores.ndim != 4 or scores.shape[0] != image.shape[0]:
            raise ValueError(f"scores must be (N, L, h, w) for {image.shape[0]} images, got {tuple(scores.shape)}")
        affinity = par_affinity(image, config)
        scores = scores.to(affinity.dtype)
        if scores.shape[-2:] != image.shape[-2:]:
            scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
        for _ in range(config.iterations):
            scores = _propagate(scores, affinity, config.dilations)
        return scores


def _propagate(scores: torch.Tensor, affinity: torch.Tensor, dilations: list[int]) -> torch.Tensor:
    """One PAR step ``Σ_k a_k(p)·S(p + offset_k)``, accumulated neighbour by neighbour: the same sum as
    ``(dilated_neighbours(S) * a).sum(2)`` without holding all K shifted copies of S (K·L maps) at once."""
    _, _, h, w = scores.shape
    reach = max(dilations)
    padded = F.pad(scores, [reach] * 4, mode="replicate")
    out = torch.zeros_like(scores)
    for k, (dy, dx) in enumerate(_offsets(dilations)):
        out = out + padded[..., reach + dy:reach + dy + h, reach + dx:reach + dx + w] * affinity[:, :, k]
    return out


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (N, C, h, w) resized to ``size`` (bilinear, align_corners=False); as it is when already that size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                        align_corners=False)


def downscaled(size: tuple[int, int] | torch.Size, downscale: int) -> tuple[int, int]:
    """The (H, W) PAR runs at: ``size`` divided by ``downscale`` (at least 1 pixel)."""
    return max(1, size[0] // downscale), max(1, size[1] // downscale)


def par_at_scale(image: torch.Tensor, probs: torch.Tensor, config: ParConfig) -> torch.Tensor:
    """KTSE's use of PAR (``refine_cams_with_bkg_v2``): image and probabilities ``(N, L, H, W)`` resized
    (bilinear) to ``(H // downscale, W // downscale)``, refined there, and the result resized back to (H, W).

    ``probs`` are the scores PAR propagates, already at the image's size; a caller that takes a softmax at the
    reduced size (as KTSE does) resizes and refines with :func:`par_refine` itself.
    """
    size = (image.shape[-2], image.shape[-1])
    small = downscaled(size, config.downscale)
    refined = par_refine(resize_bilinear(image.float(), small), resize_bilinear(probs.float(), small), config)
    return resize_bilinear(refined, size)


def refine_cams_par(image: np.ndarray, cams: np.ndarray, labels: Sequence[int], config: ParConfig,
                    bg_score: float, confidence: float = 0.0) -> np.ndarray:
    """PAR-refined ``(H, W)`` uint8 mask from ``(K, H, W)`` CAMs of the image's K tags: the fast alternative to
    :func:`wsss_ray.maths.crf.refine_cams`, with the same unary (``cams_to_probs``: a constant ``bg_score``
    background channel, then the CAMs, normalised) refined by :func:`par_at_scale` instead of DenseCRF.

    The refined scores are renormalised to sum to 1 per pixel before ``confidence`` is applied (PAR's own output
    is scaled by (1 + w2) per iteration); pixels whose top share is below it become 255.
    """

    def refine(probs: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        refined = par_at_scale(pixels, torch.from_numpy(probs)[None], config)[0]
        return (refined / refined.sum(dim=0, keepdim=True).clamp_min(1e-12)).numpy()

    return cams_to_mask(image, cams, labels, bg_score, confidence, refine)
