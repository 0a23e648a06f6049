"""Segmentation scores from a confusion matrix (after torchvision's segmentation reference).

:class:`ConfusionMatrix` counts numpy label maps (the evaluation stage); :class:`TorchConfusionMatrix` counts
tensors on the training device and sums its counts across DDP workers (validation during training).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "TorchConfusionMatrix", "confusion_counts", "mask_miou"]


class ConfusionMatrix:
    """Accumulates a ``C×C`` int64 confusion matrix: rows are targets, columns are predictions.

    ``mat`` is a plain attribute so that partial matrices computed elsewhere (per Ray task) can be added.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, target: np.ndarray, pred: np.ndarray) -> None:
        """Add one (target, prediction) pair of label maps of the same shape.

        Target pixels equal to ``ignore_index`` are skipped (VOC's object borders). Prediction pixels equal to
        ``ignore_index`` count as background (0): a pseudo-mask's "unsure" pixels must still cost it where the
        target has an object, otherwise a mask could raise its score by abstaining on every hard pixel.
        """
        target = np.asarray(target)
        pred = np.asarray(pred)
        if target.shape != pred.shape:
            raise ValueError(f"target shape {target.shape} != prediction shape {pred.shape}")
        target = target.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        pred = np.where(pred == self.ignore_index, 0, pred)
        n = self.num_classes
        for name, values in (("target", target), ("prediction", pred)):
            if values.size and (values.min() < 0 or values.max() >= n):
                bad = values[(values < 0) | (values >= n)][0]
                raise ValueError(f"{name} label {bad} out of range [0, {n}) "
                                 f"(ignore_index {self.ignore_index})")
        # one bincount over the flattened (target, pred) pair index is the fastest exact way to count
        self.mat += np.bincount(n * target + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (in place); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class and {self.num_classes}-class matrices")
        self.mat += other.mat
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.mat = self.mat.copy()
        return out.merge(other)

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN for classes absent from both target and prediction."""
        tp = np.diag(self.mat).astype(np.float64)
        union = self.mat.sum(0) + self.mat.sum(1) - np.diag(self.mat)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes that occur (NaN if nothing was counted)."""
        ious = self.iou()
        return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels labelled correctly (NaN if nothing was counted)."""
        total = self.mat.sum()
        return float(np.trace(self.mat) / total) if total else float("nan")

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-friendly scores: ``miou``, ``pixel_accuracy`` and ``per_class`` {name: IoU or None}."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        return {
            "miou": _json_float(self.miou()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "per_class": {str(name): _json_float(v) for name, v in zip(class_names, self.iou(), strict=True)},
        }

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.mat.sum())}, "
                f"miou={self.miou():.4f})")


def _json_float(value: float) -> float | None:
    # JSON has no NaN: an absent class is null, not a fake 0.
    return None if not np.isfinite(value) else float(value)


def mask_miou(targets: Iterable[np.ndarray], preds: Iterable[np.ndarray], num_classes: int,
              ignore_index: int = 255) -> float:
    """mIoU of paired label maps, accumulated over the whole set (not averaged per image)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    for target, pred in zip(targets, preds, strict=True):
        cm.update(target, pred)
    return cm.miou()


def confusion_counts(target: torch.Tensor, pred: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """The ``C×C`` int64 confusion counts of one (target, prediction) pair, on their device.

    The same rules as :meth:`ConfusionMatrix.update`: ignored target pixels are skipped, ignored predictions
    count as background. Labels are not range-checked here (that would sync the device on every image); the
    trainer's predictions are argmaxes over ``num_classes``.
    """
    keep = target != ignore_index
    target, pred = target[keep].long(), pred[keep].long()
    pred = pred.masked_fill(pred == ignore_index, 0)
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


class TorchConfusionMatrix:
    """A :class:`ConfusionMatrix` kept as a tensor on the training device, summed across DDP workers.

    Its mIoU is the same rule as :meth:`ConfusionMatrix.miou` (mean IoU over the classes whose union is > 0, NaN if
    none) computed in torch float64: numpy's ``nanmean`` sums in another order, so it can differ in the last bit,
    and the trainer's reported ``val_miou`` repeats earlier runs exactly.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one (target, prediction) pair of label maps of the same shape."""
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
        self.mat += confusion_counts(target, pred, self.num_classes, self.ignore_index)

    def all_reduce(self) -> TorchConfusionMatrix:
        """Sum the counts of every DDP worker into every worker's matrix (a no-op without a process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)
        return self

    def miou(self) -> float:
        """Mean IoU over the classes that occur (NaN if nothing was counted)."""
        mat = self.mat.double()
        union = mat.sum(0) + mat.sum(1) - mat.diag()
        iou = mat.diag() / union
        return float(iou[union > 0].mean()) if (union > 0).any() else float("nan")

    def to_numpy(self) -> ConfusionMatrix:
        """The counts as a :class:`ConfusionMatrix` (per-class scores, merging with numpy matrices)."""
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.mat = self.mat.cpu().numpy().astype(np.int64)
        return out
