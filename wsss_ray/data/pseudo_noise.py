"""How CAM + CRF pseudo-masks are wrong, measured per object against the ground truth, and the same errors drawn
onto clean masks.

Four kinds of error, each measured on the ground-truth objects (connected components of one foreground class)
of a label map (0 background, 255 ignored):

- **class swap**: the object is mostly labelled as another foreground class (a whole-object swap);
- **boundary shift**, in pixels: within ``band`` pixels of the object's outline, the object pixels labelled
  background per pixel of its outline (``shrink_px``) and the background pixels labelled as the object per pixel
  of the background ring around it (``grow_px``) — the mean distance the outline moved inward / outward (an
  erosion / dilation by r pixels of a convex object reads as about r);
- **missing part**: the share of the object's interior (farther than ``band`` from its outline) labelled
  background;
- **spill**: background pixels farther than ``band`` from the object labelled as its class, per object pixel —
  CAMs spread onto the background that co-occurs with the object (water under boats, sky around planes).

VOC's masks (and the toy data's) carry a ~2 px band of 255 on every boundary; :func:`error_counts` first gives
each 255 pixel of the ground truth its nearest label (:func:`fill_ignore`), so the band is scored like the rest
(a pseudo-mask has no such band). Swapped objects count only towards the swap rate. Sums are pooled over every object of every image, so a large
object weighs more than a small one, as it does in the pixel counts a segmenter trains on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

IGNORE = 255
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class PseudoErrorRates:
    """The four error rates of pseudo-masks (boundary as two figures); see the module docstring."""

    swap: float
    shrink_px: float
    grow_px: float
    missing: float
    spill: float

    def scaled(self, factor: float) -> PseudoErrorRates:
        """The same errors on images ``factor`` times the size: boundary shifts scale, the shares do not."""
        return PseudoErrorRates(self.swap, self.shrink_px * factor, self.grow_px * factor, self.missing, self.spill)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def fill_ignore(mask: np.ndarray) -> np.ndarray:
    """``mask`` with each 255 pixel given the label of its nearest (Euclidean) labelled pixel; all-255 stays."""
    unknown = mask == IGNORE
    if not unknown.any() or unknown.all():
        return mask.copy()
    _, (rows, cols) = ndimage.distance_transform_edt(unknown, return_indices=True)
    return mask[rows, cols]


def _objects(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, region) of each 4-connected component of each foreground class."""
    found = []
    for label in sorted(int(v) for v in np.unique(mask) if v not in (0, IGNORE)):
        components, count = ndimage.label(mask == label, structure=_CROSS)
        found += [(label, components == k) for k in range(1, count + 1)]
    return found


def _outline(region: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour outside the object (the image border counts as outside)."""
    return region & ~ndimage.binary_erosion(region, _CROSS, border_value=0)


def error_counts(pseudo: np.ndarray, truth: np.ndarray, band: int = 2,
                 classes: set[int] | None = None) -> dict[str, int]:
    """Pixel and object counts of the four errors of ``pseudo`` against ``truth`` (same shape), summed over the
    image's objects (of ``classes`` only, if given); :func:`rates_from_counts` turns (summed) counts into
    :class:`PseudoErrorRates`."""
    if pseudo.shape != truth.shape:
        raise ValueError(f"pseudo-mask shape {pseudo.shape} differs from the ground truth's {truth.shape}")
    truth = fill_ignore(truth)
    counts = dict.fromkeys(("objects", "swapped", "outline", "ring", "shrink", "grow", "interior", "missing", "area",
                            "spill"), 0)
    background = truth == 0
    for label, region in _objects(truth):
        if classes is not None and label not in classes:
            continue
        counts["objects"] += 1
        inside = pseudo[region]
        other = (inside != label) & (inside != 0) & (inside != IGNORE)
        if 2 * int(other.sum()) > int(region.sum()):
            counts["swapped"] += 1
            continue
        inner = region & (ndimage.distance_transform_cdt(region, "taxicab") <= band)
        distance_out = ndimage.distance_transform_cdt(~region, "taxicab")
        outer = background & (distance_out <= band)
        far = background & (distance_out > band)
        counts["outline"] += int(_outline(region).sum())
        counts["ring"] += int((background & (distance_out == 1)).sum())
        counts["shrink"] += int((inner & (pseudo == 0)).sum())
        counts["grow"] += int((outer & (pseudo == label)).sum())
        counts["interior"] += int((region & ~inner).sum())
        counts["missing"] += int((region & ~inner & (pseudo == 0)).sum())
        counts["area"] += int(region.sum())
        counts["spill"] += int((far & (pseudo == label)).sum())
    return counts


def rates_from_counts(counts: dict[str, int]) -> PseudoErrorRates:
    def ratio(a: str, b: str) -> float:
        return counts[a] / counts[b] if counts[b] else 0.0

    return PseudoErrorRates(swap=ratio("swapped", "objects"), shrink_px=ratio("shrink", "outline"),
                            grow_px=ratio("grow", "ring"), missing=ratio("missing", "interior"),
                            spill=ratio("spill", "area"))


def measure_error_rates(pairs: list[tuple[np.ndarray, np.ndarray]], band: int = 2) -> tuple[PseudoErrorRates,
                                                                                             dict[str, int]]:
    """The pooled rates (and counts) of ``(pseudo, truth)`` pairs."""
    total: dict[str, int] = {}
    for pseudo, truth in pairs:
        for key, value in error_counts(pseudo, truth, band).items():
            total[key] = total.get(key, 0) + value
    if not total:
        raise ValueError("measure_error_rates needs at least one (pseudo, truth) pair")
    return rates_from_counts(total), total


# ------------------------------------------------------------------------------------------------- corruption


def _round(value: float, rng: np.random.Generator) -> int:
    """``value`` rounded up with probability its fractional part: right on average."""
    whole = int(np.floor(value))
    return whole + int(rng.random() < value - whole)


def _nearest(candidates: np.ndarray, seed: tuple[int, int], count: int) -> np.ndarray:
    """The ``count`` pixels of ``candidates`` nearest to ``seed`` (a compact blob); ties by position."""
    ys, xs = np.nonzero(candidates)
    chosen = np.zeros_like(candidates)
    if count <= 0 or ys.size == 0:
        return chosen
    order = np.argsort((ys - seed[0]) ** 2 + (xs - seed[1]) ** 2, kind="stable")[:count]
    chosen[ys[order], xs[order]] = True
    return chosen


def _spill_lobe(background: np.ndarray, far: np.ndarray, start: tuple[int, int], count: int) -> np.ndarray:
    """A compact blob of ``count`` ``far`` pixels around the ``far`` pixel nearest to ``start`` (an outline pixel),
    joined to the object by the straight line of background pixels between them: a lobe attached to the object
    whose pixels within the band are only that line (so it reads back as spill, hardly as an outward shift)."""
    if count <= 0 or not far.any():
        return np.zeros_like(background)
    entry = np.argwhere(_nearest(far, start, 1))[0]
    lobe = _nearest(far, (int(entry[0]), int(entry[1])), count)
    steps = int(np.abs(entry - np.asarray(start)).max()) + 1
    line = np.rint(np.linspace(start, entry, steps)).astype(int)
    lobe[line[:, 0], line[:, 1]] |= background[line[:, 0], line[:, 1]]
    return lobe


def _pick(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(region)
    k = int(rng.integers(ys.size))
    return int(ys[k]), int(xs[k])


def corrupt_like_pseudo(truth: np.ndarray, rates: PseudoErrorRates, rng: np.random.Generator,
                        num_classes: int, band: int = 2) -> np.ndarray:
    """``truth`` with the four errors drawn at ``rates``, object by object: swapped for a random other foreground
    class (1..``num_classes``) with probability ``swap``; otherwise its outline moved out by ``grow_px`` and in by
    ``shrink_px`` pixels (rounded at random, so right on average), a compact hole of ``missing`` × its interior
    cut out, and a lobe of ``spill`` × its area grown onto the background beyond ``band`` pixels, next to a
    random outline pixel and joined to it by a line (which reads back as a little extra ``grow_px``). 255 stays 255; later objects overwrite earlier ones."""
    out = truth.copy()
    background = truth == 0
    for label, region in _objects(truth):
        if num_classes > 1 and rng.random() < rates.swap:
            out[region] = int(rng.choice([c for c in range(1, num_classes + 1) if c != label]))
            continue
        grow, shrink = _round(rates.grow_px, rng), _round(rates.shrink_px, rng)
        if grow:
            out[ndimage.binary_dilation(region, _CROSS, iterations=grow) & background] = label
        if shrink:
            out[region & ~ndimage.binary_erosion(region, _CROSS, iterations=shrink, border_value=0)] = 0
        interior = region & (ndimage.distance_transform_cdt(region, "taxicab") > band)
        if interior.any():
            out[_nearest(interior, _pick(interior, rng), _round(rates.missing * interior.sum(), rng))] = 0
        far = background & (ndimage.distance_transform_cdt(~region, "taxicab") > band)
        out[_spill_lobe(background, far, _pick(_outline(region), rng), _round(rates.spill * region.sum(), rng))] = label
    return out
