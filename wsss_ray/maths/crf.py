"""DenseCRF refinement of class activation maps (Krähenbühl & Koltun 2011, via ``pydensecrf``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from wsss_ray.core.config_base import CrfConfig

__all__ = ["cams_to_probs", "crf_inference", "refine_cams", "threshold_cams"]

# Probabilities are clipped before the log: a hard 0 would be an infinite unary the CRF could never overrule.
_PROB_FLOOR = 1e-5
_EPS = 1e-12


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        # the bilateral kernel's srgb is in 0-255 units; a float image in [0, 1] would silently disable it
        raise ValueError(f"image must be uint8, got {image.dtype}")


def crf_inference(image: np.ndarray, probs: np.ndarray, params: CrfConfig) -> np.ndarray:
    """Mean-field DenseCRF posterior ``(L, H, W)`` float32 for an RGB uint8 image and ``(L, H, W)`` probs."""
    image = np.asarray(image)
    probs = np.asarray(probs)
    _check_image(image)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (L, H, W) matching image {image.shape[:2]}, got shape {probs.shape}")
    if probs.shape[0] < 1:
        raise ValueError("probs needs at least one label")
    # imported here so that importing the package does not need the compiled extension
    from pydensecrf.densecrf import DenseCRF2D
    from pydensecrf.utils import unary_from_softmax

    n_labels, height, width = probs.shape
    unary = unary_from_softmax(np.clip(probs.astype(np.float32), _PROB_FLOOR, 1.0))
    crf = DenseCRF2D(width, height, n_labels)
    # the C++ side reads raw buffers: non-contiguous views would be read in the wrong order
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    posterior = crf.inference(params.iterations)
    return np.asarray(posterior, dtype=np.float32).reshape(n_labels, height, width)


def _check_cams(cams: np.ndarray, labels: Sequence[int]) -> None:
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {cams.shape}")
    if len(labels) != cams.shape[0]:
        raise ValueError(f"cams: {len(labels)} labels for {cams.shape[0]} CAM channels")
    for label in labels:
        if not 0 < int(label) < 255:
            raise ValueError(f"class id {label} out of range: tags are 1..254 (0 is background, 255 ignore)")


def cams_to_probs(cams: np.ndarray, bg_score: float) -> np.ndarray:
    """``(K+1, H, W)`` probabilities: a constant ``bg_score`` background channel, then the CAMs, normalised.

    Pixels where every channel is 0 (``bg_score`` 0 and no activation) become uniform rather than 0/0.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {cams.shape}")
    background = np.full((1, *cams.shape[1:]), bg_score, dtype=np.float32)
    scores = np.clip(np.concatenate([background, cams], axis=0), 0.0, None)
    total = scores.sum(axis=0, keepdims=True)
    uniform = np.float32(1.0 / scores.shape[0])
    probs = np.where(total > _EPS, scores / np.maximum(total, _EPS), uniform)
    return probs.astype(np.float32)


def threshold_cams(cams: np.ndarray, labels: Sequence[int], bg_score: float) -> np.ndarray:
    """``(H, W)`` uint8 mask: class id of the argmax over ``[bg_score, cams...]`` (ties go to background)."""
    cams = np.asarray(cams, dtype=np.float32)
    _check_cams(cams, labels)
    lut = np.array([0, *labels], dtype=np.uint8)
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    background = np.full((1, *cams.shape[1:]), bg_score, dtype=np.float32)
    return lut[np.concatenate([background, cams], axis=0).argmax(axis=0)]


def cams_to_mask(image: np.ndarray, cams: np.ndarray, labels: Sequence[int], bg_score: float,
                 confidence: float, refine: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The ``(H, W)`` uint8 mask of ``(K, H, W)`` CAMs of the image's ``K`` tags, whichever refinement: ``refine``
    maps the unary (``cams_to_probs``, background first) to refined ``(K + 1, H, W)`` scores; each pixel takes
    the label of its top score, 255 where that is below ``confidence``. No tags: all background, no refinement.
    """
    image = np.asarray(image)
    cams = np.asarray(cams, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    _check_cams(cams, labels)
    if cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams {cams.shape[1:]} and image {image.shape[:2]} differ in size")
    if cams.shape[0] == 0:
        return np.zeros(image.shape[:2], dtype=np.uint8)
    scores = refine(cams_to_probs(cams, bg_score))
    mask = np.array([0, *labels], dtype=np.uint8)[scores.argmax(axis=0)]
    if confidence > 0:
        mask[scores.max(axis=0) < confidence] = 255
    return mask


def refine_cams(image: np.ndarray, cams: np.ndarray, labels: Sequence[int], params: CrfConfig,
                bg_score: float, confidence: float = 0.0) -> np.ndarray:
    """DenseCRF-refined ``(H, W)`` uint8 mask from ``(K, H, W)`` CAMs of the image's ``K`` tags.

    The CRF runs over background + the tags only: the absent classes would have ~0 probability anyway and
    each extra label costs CRF time (21 labels took 2-3x as long as 3 on a VOC-sized image). Pixels whose
    posterior maximum is below ``confidence`` become 255 (ignored by the segmentation loss).
    """
    image = np.asarray(image)
    _check_image(image)
    return cams_to_mask(image, cams, labels, bg_score, confidence, lambda probs: crf_inference(image, probs, params))
