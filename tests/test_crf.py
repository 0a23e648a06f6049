"""DenseCRF refinement: faithful to pydensecrf, label restriction is lossless, and it actually helps."""

from __future__ import annotations

import numpy as np
import pytest
from pydensecrf.densecrf import DenseCRF2D
from pydensecrf.utils import unary_from_softmax

from wsss_ray.core.config_base import CrfConfig
from wsss_ray.maths.crf import cams_to_probs, crf_inference, refine_cams, threshold_cams
from wsss_ray.maths.metrics import mask_miou

H, W = 72, 96
CAT, DOG = 8, 12  # VOC class ids of the two synthetic objects


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur in numpy (kept independent of scipy)."""
    radius = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda r: np.convolve(np.pad(r, radius, mode="edge"), k, "valid"), 1, x)
    return np.apply_along_axis(lambda c: np.convolve(np.pad(c, radius, mode="edge"), k, "valid"), 0, x)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy image with a red disk (CAT) and a blue box (DOG); returns image, ground truth, blurry CAMs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    disk = (yy - 36) ** 2 + (xx - 28) ** 2 < 16**2
    box = (yy > 20) & (yy < 56) & (xx > 58) & (xx < 86)
    gt = np.zeros((H, W), np.uint8)
    gt[disk], gt[box] = CAT, DOG
    image = np.full((H, W, 3), 70.0)
    image[disk] = (210, 40, 40)
    image[box] = (40, 60, 210)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    # CAMs as a weak classifier gives them: blurry, shifted off the object, peak-normalised to 1
    cams = []
    for obj, shift in ((disk, (4, 5)), (box, (-3, -5))):
        cam = _blur(np.roll(obj, shift, axis=(0, 1)).astype(np.float64), sigma=5)
        cams.append(cam / cam.max())
    return image, gt, np.stack(cams).astype(np.float32)


def test_crf_inference_matches_direct_pydensecrf() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    logits = rng.normal(size=(4, 30, 40))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    probs[2, :5, :5] = 0.0  # exercises the clip to 1e-5
    params = CrfConfig(iterations=5, gaussian_sxy=2, gaussian_compat=4, bilateral_sxy=30, bilateral_srgb=10,
                       bilateral_compat=7)

    crf = DenseCRF2D(40, 30, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-5, 1.0))))
    crf.addPairwiseGaussian(sxy=2, compat=4)
    crf.addPairwiseBilateral(sxy=30, srgb=10, rgbim=np.ascontiguousarray(image), compat=7)
    expected = np.array(crf.inference(5), dtype=np.float32).reshape(4, 30, 40)

    # a non-contiguous image view must give the same answer
    got = crf_inference(np.asfortranarray(image), probs, params)
    assert got.shape == (4, 30, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-4)


def test_restricted_labels_match_full_label_crf() -> None:
    image, _, cams = _scene()
    params, bg = CrfConfig(), 0.3
    restricted = refine_cams(image, cams, [CAT, DOG], params, bg)

    # the same CRF over all 21 VOC labels, absent classes given ~0 probability (clipped to 1e-5 like the rest)
    small = cams_to_probs(cams, bg)
    full = np.full((21, H, W), 1e-8, np.float32)
    full[0], full[CAT], full[DOG] = small[0], small[1], small[2]
    full /= full.sum(0, keepdims=True)
    full_mask = crf_inference(image, full, params).argmax(0).astype(np.uint8)

    # Not bit-identical in general: the absent labels keep a 1e-5 floor that enters the mean-field messages;
    # that can flip a few boundary pixels at most, so require >= 99% agreement (on this scene it is 100%).
    assert set(np.unique(full_mask)) <= {0, CAT, DOG}
    assert np.mean(restricted == full_mask) >= 0.99


def test_crf_improves_blurry_shifted_cams() -> None:
    image, gt, cams = _scene()
    bg = 0.3
    before = mask_miou([gt], [threshold_cams(cams, [CAT, DOG], bg)], 21)
    after = mask_miou([gt], [refine_cams(image, cams, [CAT, DOG], CrfConfig(), bg)], 21)
    assert after > before + 0.05, (before, after)


def test_confidence_threshold_marks_unsure_pixels() -> None:
    image, _, cams = _scene()
    plain = refine_cams(image, cams, [CAT, DOG], CrfConfig(), 0.3)
    assert not (plain == 255).any()
    unsure = refine_cams(image, cams, [CAT, DOG], CrfConfig(), 0.3, confidence=0.999)
    marked = unsure == 255
    assert 0 < marked.sum() < marked.size
    np.testing.assert_array_equal(unsure[~marked], plain[~marked])  # confident pixels keep their label


def test_no_tags_is_all_background() -> None:
    image, _, _ = _scene()
    empty = np.zeros((0, H, W), np.float32)
    assert not refine_cams(image, empty, [], CrfConfig(), 0.3).any()
    assert not threshold_cams(empty, [], 0.3).any()
    assert cams_to_probs(empty, 0.3).shape == (1, H, W)


def test_probs_and_threshold() -> None:
    cams = np.array([[[0.0, 0.5, 0.9]], [[0.0, 0.7, 0.1]]], np.float32)  # K=2, H=1, W=3
    probs = cams_to_probs(cams, 0.4)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[:, 0, 1], np.array([0.4, 0.5, 0.7]) / 1.6, rtol=1e-6)
    np.testing.assert_array_equal(threshold_cams(cams, [5, 9], 0.4), [[0, 9, 5]])
    # all-zero pixel with bg_score 0: uniform, not NaN
    np.testing.assert_allclose(cams_to_probs(cams, 0.0)[:, 0, 0], 1 / 3)


def test_shape_errors() -> None:
    image, _, cams = _scene()
    with pytest.raises(ValueError, match="image"):
        refine_cams(image[..., :2], cams, [CAT, DOG], CrfConfig(), 0.3)
    with pytest.raises(ValueError, match="uint8"):
        crf_inference(image.astype(np.float32), cams_to_probs(cams, 0.3), CrfConfig())
    with pytest.raises(ValueError, match="differ in size"):
        refine_cams(image, cams[:, :10], [CAT, DOG], CrfConfig(), 0.3)
    with pytest.raises(ValueError, match="labels"):
        refine_cams(image, cams, [CAT], CrfConfig(), 0.3)
    with pytest.raises(ValueError, match="probs"):
        crf_inference(image, np.ones((2, 5, 5), np.float32), CrfConfig())


def test_crf_postprocess_keeps_only_labels_with_mass_and_maps_them_back() -> None:
    from wsss_ray.stages.evaluate import crf_postprocess

    image, truth, _ = _scene()
    h, w = truth.shape
    probs = np.full((6, h, w), 1e-4, np.float32)
    # The network's belief: the truth's labels as 0 and 4 (labels 1-3 and 5 have no mass anywhere).
    probs[0] = np.where(truth == 0, 0.8, 0.2)
    probs[4] = 1.0 - probs[0]
    probs /= probs.sum(0, keepdims=True)
    out = crf_postprocess(image, probs, CrfConfig())
    assert set(np.unique(out).tolist()) <= {0, 4}
    assert mask_miou(np.where(truth == 0, 0, 4), out, 5) > 0.9
    # One label everywhere needs no CRF.
    single = np.zeros((3, h, w), np.float32)
    single[2] = 1.0
    assert (crf_postprocess(image, single, CrfConfig()) == 2).all()
