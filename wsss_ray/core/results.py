"""Typed, frozen results of the stages (what each stage's ``_SUCCESS.json`` holds), one type per kind of stage:
ingest, training (``train_cls``, ``train_seg``), pseudo-labels and evaluation, so that a later stage reads named
fields instead of nested keys of a ``dict[str, Any]``.

The summaries themselves stay JSON mappings (they are written, read back on resume and shown as they are); the
wiring (``wsss_ray/wiring.py``) builds these records from them once, with ``from_summary``, and hands them to the
stages that need an earlier stage's results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IngestResult:
    """The manifest stage: how many images each split kept, and the unreadable ones."""

    per_split: Mapping[str, int]
    failed: int
    failures_uri: str | None
    seconds: float | None = None

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> IngestResult:
        return cls(dict(summary.get("per_split") or {}), int(summary["failed"]), summary.get("failures_uri"),
                   summary.get("seconds"))


@dataclass(frozen=True)
class TrainingResult:
    """A training stage (``train_cls``, ``train_seg``): the exported weights and the per-epoch history."""

    model_uri: str
    model_sha256: str | None
    history: tuple[Mapping[str, Any], ...]
    seconds: float | None = None

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> TrainingResult:
        return cls(summary["model_uri"], summary.get("model_sha256"), tuple(summary.get("history") or ()),
                   summary.get("seconds"))


@dataclass(frozen=True)
class PseudoLabelResult:
    """The pseudo-label stage: the scores of every scored output on the training images, failures and speed."""

    scores: Mapping[str, Mapping[str, Any]]
    failed: int
    failures_uri: str | None
    mean_seconds_per_image: float | None = None
    images_per_s: float | None = None
    seconds: float | None = None
    written: int | None = None

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> PseudoLabelResult:
        return cls(dict(summary.get("scores") or {}), int(summary["failed"]), summary.get("failures_uri"),
                   summary.get("mean_seconds_per_image"), summary.get("images_per_s"), summary.get("seconds"),
                   summary.get("written"))


@dataclass(frozen=True)
class EvaluationResult:
    """What scoring a model on a split gives: its scores (with the CRF when enabled, and without), the summed
    confusion matrix and the images that failed."""

    scores: Mapping[str, Any]
    scores_raw: Mapping[str, Any]
    confusion: list[list[int]]
    images: int
    failed: int
    failures: tuple[Mapping[str, Any], ...]
    samples_uri: str = ""  # the predicted masks of the report's samples

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> EvaluationResult:
        return cls(summary["scores"], summary["scores_raw"], summary["confusion"], int(summary["images"]),
                   int(summary["failed"]), tuple(summary.get("failures") or ()), summary.get("samples_uri", ""))


@dataclass(frozen=True)
class ReportedRun:
    """The ``evaluate`` stage: the run's metrics (what ``metrics.json`` holds), its HTML report, images predicted."""

    metrics: Mapping[str, Any]
    report_uri: str
    evaluated: int

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> ReportedRun:
        return cls(summary["metrics"], summary["report_uri"], int(summary["evaluated"]))

    def summary(self) -> dict[str, Any]:
        """The stage's own summary (``_SUCCESS.json`` adds stage, key, uri and seconds)."""
        return {"metrics": dict(self.metrics), "report_uri": self.report_uri, "evaluated": self.evaluated}


@dataclass(frozen=True)
class FinishedStages:
    """The results of the stages before ``evaluate``, in pipeline order."""

    ingest: IngestResult
    train_cls: TrainingResult
    pseudo_labels: PseudoLabelResult
    train_seg: TrainingResult

    def seconds(self) -> dict[str, float | None]:
        """Each stage's run time, in pipeline order (None for a stage finished before times were kept)."""
        return {"ingest": self.ingest.seconds, "train_cls": self.train_cls.seconds,
                "pseudo_labels": self.pseudo_labels.seconds, "train_seg": self.train_seg.seconds}
