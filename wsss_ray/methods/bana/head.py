"""BANA's background-aware pooling (BAP) head (Oh, Kim, Ham, CVPR 2021, Sec. 3.1), in torch.

The head sits on a backbone's feature map f ``(N, D, h, w)`` and classifies, with one (L+1)-way classifier ``w``
(row 0 = background; linear by default, Eq. 6, or cosine), two kinds of vectors: the background queries ``q_j`` (Eq. 1) and the box features
``r_i`` (Eq. 4) pooled with the foreground weight ``1 − A`` of the background attention ``A`` (Eqs. 2–3).

Conventions are those of :mod:`wsss_ray.methods.bana.boxes` (the numpy BAP maths used at generation time): boxes
are rows ``[label, x1, y1, x2, y2]`` in image pixels with ``x2``/``y2`` exclusive; feature cell ``(i, j)`` stands
for the image region ``[j·W/w, (j+1)·W/w) × [i·H/h, (i+1)·H/h)`` and lies inside a box when its centre does (BANA
resizes the boxes to the feature map "using nearest-neighbor interpolation"). Batched boxes are ``(N, B, 5)``
with padding rows of label −1; only rows with a label ≥ 1 are boxes (0 is the background class, never a box).

All maths runs in float32 (float64 when given float64, for gradcheck) with autocast disabled, so the head is
safe inside a bf16 autocast region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.data.transforms import CropGeometry, transform_boxes
from wsss_ray.methods.bana.boxes import boxes_array
from wsss_ray.methods.bana.config import BapHeadConfig
from wsss_ray.methods.base import ClassifierHead

__all__ = ["BapHead", "cosine_logits", "valid_boxes"]

# Same floor as boxes._unit: a zero feature (common after a ReLU) gets cosine 0 with everything, not NaN.
_EPS = 1e-6

_Fn = TypeVar("_Fn", bound=Callable[..., Any])

# Boxes per training crop (padded to a fixed shape); VOC images have at most ~40, crops far fewer.
MAX_BOXES = 32


def _full_precision(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast off: cosine similarities and the (1 − A) normaliser lose too much in bf16."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _compute(x: torch.Tensor) -> torch.Tensor:
    """float32 for the head's maths, but keep float64 so that gradcheck can run in double precision."""
    return x if x.dtype == torch.float64 else x.float()


def valid_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, B)`` bool: the rows of ``boxes`` ``(N, B, 5)`` that are boxes (label ≥ 1), not padding (label −1).

    ``box_features`` returns one row per ``True`` here, in ``boxes[valid]`` order (image-major, then row order).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 5:
        raise ValueError(f"boxes must be (N, B, 5) rows [label, x1, y1, x2, y2], got {tuple(boxes.shape)}")
    return boxes[..., 0] >= 1


def cosine_logits(vectors: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Cosine classifier ``s·cos(v, w_c)`` ``(..., C+1)`` for vectors ``(..., D)`` and weights ``(C+1, D)``.

    The scale s makes the softmax able to approach one-hot: a cosine in [−1, 1] alone caps the top probability
    at e/(e + L·e⁻¹) ≈ 0.27 for L = 20.
    """
    return scale * F.normalize(vectors, dim=-1, eps=_EPS) @ F.normalize(weight, dim=-1, eps=_EPS).T


def _chunk_ids(size: int, parts: int, device: torch.device) -> torch.Tensor:
    """Chunk index of each of ``size`` positions under ``np.array_split(range(size), parts)``: the first
    ``size % parts`` chunks are one longer (the split ``boxes.background_attention`` uses)."""
    base, extra = divmod(size, parts)
    ids = [k for k in range(parts) for _ in range(base + (k < extra))]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _cells_in_boxes(boxes: torch.Tensor, feature_shape: tuple[int, int],
                    image_shape: tuple[int, int]) -> torch.Tensor:
    """``(N, B, h, w)`` bool: feature cells whose centre lies inside box b of image n (padding rows: none)."""
    h, w = feature_shape
    height, width = image_shape
    # float64 centres, as in boxes.cell_centres_in_boxes, so a centre on a box edge is decided identically.
    coords = boxes.to(torch.float64)
    cy = (torch.arange(h, dtype=torch.float64, device=boxes.device) + 0.5) * height / h
    cx = (torch.arange(w, dtype=torch.float64, device=boxes.device) + 0.5) * width / w
    x1, y1, x2, y2 = (coords[..., k, None] for k in range(1, 5))
    rows = (cy >= y1) & (cy < y2)  # (N, B, h)
    cols = (cx >= x1) & (cx < x2)  # (N, B, w)
    return rows[..., :, None] & cols[..., None, :] & valid_boxes(boxes)[..., None, None]


class BapHead(ClassifierHead):
    """BAP classifier head over ``num_foreground`` classes plus background (BANA Sec. 3.1).

    ``weight`` ``(C+1, D)`` is the (L+1)-way classifier ``w``, row 0 = background. ``classifier: linear``
    (default): logits ``w_c·v`` and CAMs ``ReLU(f·w_c)``, BANA's Eq. 6 and the authors' stage-1 ``ClsNet`` (a
    bias-free 1x1 conv, weights drawn with std 0.01). ``cosine`` (our earlier reading): logits ``scale·cos(v, w_c)``
    and CAMs ``ReLU(cos(f, w_c))``; BANA's cosine classifier (footnote 4) is its stage-3 segmenter's. The box
    generator's in-box unaries u_c come from ``cams``, so they follow the chosen classifier; the background
    attention A is a cosine with the background queries (Eq. 2) whatever the classifier.
    """

    @staticmethod
    def sample_fields(row: Mapping[str, Any], geometry: CropGeometry, image_shape: tuple[int, ...]) -> dict[str, Any]:
        """The image's boxes moved into the crop's frame, padded to ``MAX_BOXES`` rows (what BAP pools over)."""
        return {"boxes": transform_boxes(boxes_array(row.get("boxes")), geometry, image_shape[:2], MAX_BOXES)}

    def __init__(self, in_channels: int, num_foreground: int, config: BapHeadConfig) -> None:
        super().__init__()
        self.num_foreground = num_foreground
        self.grid = config.grid
        self.cosine = config.classifier == "cosine"
        self.scale = config.scale
        if self.cosine:
            # Rows of unit norm on average: the gradient of cos(v, w) w.r.t. w scales as 1/‖w‖, so a tiny init
            # would multiply the head's effective learning rate by 1/‖w‖.
            init = torch.randn(num_foreground + 1, in_channels) / math.sqrt(in_channels)
        else:
            init = torch.randn(num_foreground + 1, in_channels) * 0.01  # the authors' normal_(std=0.01)
        self.weight = nn.Parameter(init)

    def classify(self, vectors: torch.Tensor) -> torch.Tensor:
        """(L+1)-way logits ``(..., C+1)`` of vectors ``(..., D)``, column 0 = background: ``w_c·v`` (linear) or
        ``scale·cos(v, w_c)`` (cosine)."""
        vectors = _compute(vectors)
        weight = self.weight.to(vectors.dtype)
        if self.cosine:
            return cosine_logits(vectors, weight, self.scale)
        return vectors @ weight.T

    @staticmethod
    def background_mask(boxes: torch.Tensor, feature_shape: tuple[int, int],
                        image_shape: tuple[int, int]) -> torch.Tensor:
        """BANA's definite-background mask M ``(N, h, w)`` bool: cells whose centre is outside every box.

        ``boxes`` ``(N, B, 5)`` in pixels of an image of ``image_shape`` (H, W); padding rows are skipped, so an
        image without boxes is all background.
        """
        return ~_cells_in_boxes(boxes, feature_shape, image_shape).any(dim=1)

    @_full_precision
    def background_queries(self, features: torch.Tensor, background: torch.Tensor,
                           grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Background queries (BANA Eq. 1) ``q_j = Σ_{p∈G(j)} M(p) f(p) / Σ_{p∈G(j)} M(p)``.

        The map is split into ``grid``×``grid`` cells ``G(j)`` (``self.grid`` by default; as equal as the size
        allows, the larger ones first, like ``np.array_split``), numbered row-major. Returns ``queries``
        ``(N, grid², D)`` and ``valid`` ``(N, grid²)`` bool: a grid cell with no background cell (BANA's "invalid
        cell") has no query; its row is 0 and must be skipped. With ``grid`` larger than the map, the empty grid
        cells are invalid too.
        """
        grid = self.grid if grid is None else grid
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        features = _compute(features)
        n, d, h, w = features.shape
        if background.shape != (n, h, w):
            raise ValueError(f"background {tuple(background.shape)} does not match features {tuple(features.shape)}")
        cell = _chunk_ids(h, grid, features.device)[:, None] * grid + _chunk_ids(w, grid, features.device)[None, :]
        member = F.one_hot(cell.flatten(), grid * grid).to(features.dtype)  # (hw, J)
        weights = background.flatten(1).to(features.dtype)[:, :, None] * member  # (N, hw, J): M(p)·[p ∈ G(j)]
        counts = weights.sum(dim=1)  # (N, J)
        sums = torch.einsum("ndp,npj->njd", features.reshape(n, d, h * w), weights)
        return sums / counts.clamp_min(1.0)[..., None], counts > 0

    @_full_precision
    def attention(self, features: torch.Tensor, background: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """Background attention (BANA Eqs. 2–3) ``(N, h, w)``: ``A(p) = 1/J Σ_j ReLU(cos(f(p), q_j))`` inside the
        boxes and ``A = 1`` on the background ``M``, over the J valid queries of ``background_queries``.

        Inside the boxes this equals ``boxes.background_attention`` (numpy, the generator's A). Our reading for an
        image without any background cell (boxes cover it all): there is no query, and A = 0 inside the boxes,
        so BAP falls back to GAP over each box (the official code's fallback too).
        """
        features = _compute(features)
        queries, valid = self.background_queries(features, background, grid)
        n, d, h, w = features.shape
        unit_f = F.normalize(features.reshape(n, d, h * w), dim=1, eps=_EPS)
        cos = torch.einsum("njd,ndp->njp", F.normalize(queries, dim=-1, eps=_EPS), unit_f)
        valid_f = valid.to(features.dtype)
        inside = (F.relu(cos) * valid_f[..., None]).sum(dim=1) / valid_f.sum(dim=1, keepdim=True).clamp_min(1.0)
        return torch.where(background, torch.ones_like(inside.reshape(n, h, w)), inside.reshape(n, h, w))

    @_full_precision
    def box_features(self, features: torch.Tensor, boxes: torch.Tensor, attention: torch.Tensor,
                     image_shape: tuple[int, int]) -> torch.Tensor:
        """Box features by background-aware pooling (BANA Eq. 4) ``(K, D)``, one per valid box in
        ``boxes[valid_boxes(boxes)]`` order: ``r_i = Σ_{p∈B_i} (1 − A(p)) f(p) / Σ_{p∈B_i} (1 − A(p))``.

        ``p ∈ B_i`` are the feature cells whose centre lies in box i. Our readings where the paper is silent:

        * BANA pools with RoIAlign (footnote 2); without torchvision we pool the box's cells directly, and a box
          too small to hold any cell centre takes f bilinearly sampled at the box centre (RoIAlign's single
          sample; one point's weighted mean is the point itself, whatever its A).
        * If ``Σ (1 − A)`` vanishes (every cell of the box is exactly background-like), the weights are
          undefined; we use the plain mean over the box (GAP, the A = 0 case of Eq. 4) instead of dividing by ~0.
        """
        features = _compute(features)
        attention = attention.to(features.dtype)
        h, w = features.shape[-2:]
        height, width = image_shape
        inside = _cells_in_boxes(boxes, (h, w), image_shape).to(features.dtype)  # (N, B, h, w)
        foreground = (1.0 - attention)[:, None] * inside
        mass = foreground.sum(dim=(2, 3))
        count = inside.sum(dim=(2, 3))
        weights = torch.where((mass > _EPS)[..., None, None], foreground / mass.clamp_min(_EPS)[..., None, None],
                              inside / count.clamp_min(1.0)[..., None, None])
        pooled = torch.einsum("nbhw,ndhw->nbd", weights, features)
        # Box centre in grid_sample's coordinates: with align_corners=False, −1 and 1 are the image's outer
        # edges, exactly our cell convention (cell j's centre at (j + 0.5)·W/w).
        coords = boxes.to(features.dtype)
        centre_x = (coords[..., 1] + coords[..., 3]) / width - 1.0
        centre_y = (coords[..., 2] + coords[..., 4]) / height - 1.0
        grid = torch.stack([centre_x, centre_y], dim=-1)[:, :, None, :]  # (N, B, 1, 2)
        sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = sampled[..., 0].transpose(1, 2)  # (N, D, B, 1) -> (N, B, D)
        return torch.where((count > 0)[..., None], pooled, sampled)[valid_boxes(boxes)]

    @_full_precision
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image logits ``(N, C)`` of GAP(f) for the foreground classes c = 1..C (``classify``'s logits).

        Not part of BANA's training (that is ``BapObjective``); it lets the head stand in for ``GapHead`` with the
        generic multi-label loss and CAM tooling. Our reading: the background row is left out, since image-level
        tags never name the background.
        """
        pooled = _compute(features).mean(dim=(2, 3))
        return self.classify(pooled)[:, 1:]

    @_full_precision
    def cams(self, features: torch.Tensor) -> torch.Tensor:
        """Un-normalised CAMs ``(N, C, h, w)`` of the foreground classes: ``ReLU(f(p)·w_c)`` (linear, BANA Eq. 6)
        or ``ReLU(cos(f(p), w_c))`` (cosine); the contract of ``GapHead.cams``. The box generator divides each by
        its maximum inside its boxes (BANA Eq. 5)."""
        features = _compute(features)
        weight = self.weight[1:].to(features.dtype)
        if self.cosine:
            weight = F.normalize(weight, dim=-1, eps=_EPS)
            features = F.normalize(features, dim=1, eps=_EPS)
        return F.relu(torch.einsum("cd,ndhw->nchw", weight, features))

    def class_weights(self) -> torch.Tensor:
        """The classifier's rows ``(C+1, D)``, row 0 = background: the box generator's Y_ret falls back to the
        normalised ``w_c`` for a tag absent from Y_crf (authors' stage2.py)."""
        return self.weight.detach()
