"""Pseudo-mask error rates and the corruption that draws them (``wsss_ray.data.pseudo_noise``), on hand-made
masks whose counts are worked out in the comments. And the robust-regime bench's
memorisation share and onset (``bench/regime_train.py``, ``bench/regime_report.py``). No Ray.""" 

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from wsss_ray.data.pseudo_noise import (
    PseudoErrorRates,
    corrupt_like_pseudo,
    error_counts,
    fill_ignore,
    measure_error_rates,
)

ZERO = PseudoErrorRates(swap=0.0, shrink_px=0.0, grow_px=0.0, missing=0.0, spill=0.0)


def square(size: int = 10, top: int = 3, side: int = 4, label: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[top:top + side, top:top + side] = label
    return mask


def test_counts_of_each_error_on_one_square() -> None:
    # A 4×4 object at rows/cols 3-6 of a 10×10 image, band 1: its outline is the 12-pixel ring of the square,
    # its interior the 4 centre pixels, the background ring around it (4-neighbours) 16 pixels.
    truth = square()
    pseudo = truth.copy()
    pseudo[3, 3] = 0  # an outline pixel lost: shrink
    pseudo[4, 4] = 0  # an interior pixel lost: missing part
    pseudo[2, 4] = 1  # a background pixel 1 px from the object: grow
    pseudo[0, 9] = 1  # a background pixel far from it: spill
    counts = error_counts(pseudo, truth, band=1)
    assert counts == {"objects": 1, "swapped": 0, "outline": 12, "ring": 16, "shrink": 1, "grow": 1,
                      "interior": 4, "missing": 1, "area": 16, "spill": 1}
    rates, _ = measure_error_rates([(pseudo, truth)], band=1)
    assert rates == PseudoErrorRates(swap=0.0, shrink_px=1 / 12, grow_px=1 / 16, missing=0.25, spill=1 / 16)


def test_a_whole_object_swap_counts_only_as_a_swap() -> None:
    truth = square(size=12, top=1, side=3, label=1)
    truth[7:10, 7:10] = 2
    pseudo = truth.copy()
    pseudo[1:4, 1:4] = 2  # object 1 read as class 2: swapped; its boundary is not scored
    pseudo[7, 7:10] = 3   # object 2: 3 of 9 pixels another class, not a majority: not swapped
    counts = error_counts(pseudo, truth, band=1)
    assert (counts["objects"], counts["swapped"]) == (2, 1)
    assert counts["area"] == 9 and counts["shrink"] == 0  # only object 2 scored; class 3 is not background
    assert measure_error_rates([(pseudo, truth)], band=1)[0].swap == 0.5
    assert error_counts(pseudo, truth, band=1, classes={2})["swapped"] == 0  # object 1 left out


def test_the_ground_truths_ignore_band_is_scored_as_its_nearest_label() -> None:
    # A 2-px 255 band between an object (cols 0-2) and background (cols 5-7): col 3 is 1 px from the object and
    # 2 px from the background, col 4 the other way round, so the band splits between them.
    banded = np.tile(np.array([1, 1, 1, 255, 255, 0, 0, 0], np.uint8), (3, 1))
    filled = np.tile(np.array([1, 1, 1, 1, 0, 0, 0, 0], np.uint8), (3, 1))
    np.testing.assert_array_equal(fill_ignore(banded), filled)
    pseudo = filled.copy()
    pseudo[:, 4] = 1  # one column grown into the (former) band: counted as the filled truth's background
    assert error_counts(pseudo, banded, band=1) == error_counts(pseudo, filled, band=1)
    assert error_counts(pseudo, banded, band=1)["grow"] == 3
    np.testing.assert_array_equal(fill_ignore(np.full((2, 2), 255, np.uint8)), np.full((2, 2), 255))


def test_shape_mismatch_and_no_pairs_are_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        error_counts(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        measure_error_rates([])


def test_corruption_at_zero_rates_is_the_identity_and_keeps_ignore() -> None:
    truth = square()
    truth[0, :] = 255
    out = corrupt_like_pseudo(truth, ZERO, np.random.default_rng(0), num_classes=4, band=1)
    np.testing.assert_array_equal(out, truth)


def test_whole_pixel_boundary_shifts_read_back_exactly() -> None:
    # A dilation by 1 fills the 16-pixel ring: grow 16 / 16 = 1 px; an erosion by 1 removes the 12-pixel outline:
    # shrink 12 / 12 = 1 px. Integer rates are drawn without rounding noise.
    truth = square()
    grown = corrupt_like_pseudo(truth, PseudoErrorRates(0, 0, 1.0, 0, 0), np.random.default_rng(0), 4, band=1)
    np.testing.assert_array_equal(grown, np.where(ndimage.binary_dilation(truth == 1, ndimage.generate_binary_structure(2, 1)), 1, 0))
    assert measure_error_rates([(grown, truth)], band=1)[0].grow_px == 1.0
    shrunk = corrupt_like_pseudo(truth, PseudoErrorRates(0, 1.0, 0, 0, 0), np.random.default_rng(0), 4, band=1)
    assert shrunk.sum() == 4 and (shrunk[4:6, 4:6] == 1).all()
    assert measure_error_rates([(shrunk, truth)], band=1)[0].shrink_px == 1.0


def test_missing_part_and_spill_have_the_asked_size_and_read_back() -> None:
    # 6×6 object, band 1: interior 4×4 = 16 pixels; missing 0.25 → a compact 4-pixel hole; spill 0.25 of 36 = 9
    # pixels beyond the band, in one lobe attached to the object.
    truth = square(size=16, top=5, side=6)
    rates = PseudoErrorRates(swap=0.0, shrink_px=0.0, grow_px=0.0, missing=0.25, spill=0.25)
    out = corrupt_like_pseudo(truth, rates, np.random.default_rng(3), num_classes=4, band=1)
    counts = error_counts(out, truth, band=1)
    assert (counts["missing"], counts["spill"]) == (4, 9)
    hole = (truth == 1) & (out == 0)
    assert ndimage.label(hole)[1] == 1
    assert ndimage.label(out == 1, structure=ndimage.generate_binary_structure(2, 1))[1] == 1  # lobe attached
    measured = measure_error_rates([(out, truth)], band=1)[0]
    # The lobe crosses the 1-px band to stay attached: its band pixels read as a little outward shift.
    assert measured.grow_px > 0 and measured.spill == 0.25 and measured.missing == 0.25
    assert (measured.swap, measured.shrink_px) == (0.0, 0.0)


def test_swap_relabels_whole_objects_to_another_foreground_class() -> None:
    truth = square(size=12, top=1, side=3, label=1)
    truth[7:10, 7:10] = 2
    rates = PseudoErrorRates(swap=1.0, shrink_px=0.0, grow_px=0.0, missing=0.0, spill=0.0)
    for seed in range(5):
        out = corrupt_like_pseudo(truth, rates, np.random.default_rng(seed), num_classes=3, band=1)
        np.testing.assert_array_equal(out == 0, truth == 0)  # shapes unchanged
        for label in (1, 2):
            values = np.unique(out[truth == label])
            assert values.size == 1 and values[0] not in (0, label) and 1 <= values[0] <= 3


def test_fractional_rates_are_right_on_average() -> None:
    truth = square(size=20, top=6, side=8)
    rates = PseudoErrorRates(swap=0.0, shrink_px=0.5, grow_px=0.0, missing=0.0, spill=0.0)
    rng = np.random.default_rng(0)
    pairs = [(corrupt_like_pseudo(truth, rates, rng, 4, band=2), truth) for _ in range(200)]
    assert measure_error_rates(pairs, band=2)[0].shrink_px == pytest.approx(0.5, abs=0.08)


# ------------------------------------------------------------------------------------------------- the bench's figures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from regime_report import memorisation, memorises, onset  # bench/ is not a package


def test_memorisation_shares_on_hand_counted_pixels() -> None:
    clean = torch.tensor([[0, 0, 0, 1, 1, 255]])
    noisy = torch.tensor([[1, 1, 0, 0, 1, 1]])  # noisy pixels 0, 1 (label 1, GT 0) and 3 (label 0, GT 1); 5 ignored
    predicted = torch.tensor([[1, 0, 0, 1, 0, 1]])  # noisy: 0 memorised, 1 and 3 right; clean: 2 right, 4 wrong
    # Three different shares, so an implementation that swapped two of them fails.
    assert memorisation(predicted, clean, noisy) == pytest.approx(
        {"memorised": 1 / 3, "noisy_right": 2 / 3, "clean_right": 1 / 2})


def test_onset_is_where_the_curve_leaves_its_low_band_for_good() -> None:
    # low 0, end = mean(0.8, 0.9, 0.9) = 0.8667, bar = 0.25 of the rise = 0.2167; below it: epochs 0, 2, 3 (the
    # early swing to 0.3 at epoch 1 does not count) → 4 epochs trained before the rise.
    curve = [0.0, 0.3, 0.05, 0.1, 0.5, 0.8, 0.9, 0.9]
    assert onset(curve) == 4
    assert memorises(curve, 0.15) and not memorises([0.2, 0.25, 0.3], 0.15)
    assert onset([0.5, 0.4, 0.3, 0.3, 0.3]) is None and onset([]) is None  # ends at its minimum: no rise
