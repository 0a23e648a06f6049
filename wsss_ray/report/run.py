"""A finished run's metrics (``metrics.json``) and HTML report, assembled from the stages' typed results.

The ``evaluate`` stage only evaluates (``stages/evaluate.py``: predictions, confusion matrices, scores); what a
run reports about itself, its headline mIoUs, per-class tables, failures, curves and sample panels, is put
together here from the results of every stage (``core/results.py``), without reading any config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsss_ray.core import storage
from wsss_ray.core.records import ManifestRecord
from wsss_ray.core.results import EvaluationResult, FinishedStages
from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.report.html import write_report


@dataclass(frozen=True)
class RunFacts:
    """What the report says about the run besides the stages' results: its name, the scored splits, the class
    names, the scored pseudo-label outputs (folder name → display name, in display order) and the stage folders."""

    name: str
    train_split: str
    val_split: str
    class_names: list[str]
    titles: Mapping[str, str]
    stage_uris: Mapping[str, str]


def background_only_scores(confusion: list[list[int]], names: list[str]) -> dict[str, Any]:
    """Scores of predicting background everywhere, from the real confusion matrix's ground-truth totals."""
    mat = np.asarray(confusion, np.int64)
    baseline = ConfusionMatrix(len(names))
    baseline.mat[:, 0] = mat.sum(1)
    return baseline.to_dict(names)


def run_metrics(facts: RunFacts, done: FinishedStages, result: EvaluationResult) -> dict[str, Any]:
    """What ``metrics.json`` holds: the headline mIoUs, per-class IoU of every scored mask set, failures, times
    (the caller adds ``ground_truth``: which ground truth each split was scored against)."""
    pseudo = done.pseudo_labels
    background = background_only_scores(result.confusion, facts.class_names)
    return {
        "name": facts.name,
        "val_miou": result.scores["miou"],
        # With evaluate.crf the headline is the CRF-post-processed prediction; this is the network's own.
        "val_miou_without_crf": result.scores_raw["miou"],
        "background_only_miou": background["miou"],
        "pseudo_mask_miou": {k: v["miou"] for k, v in pseudo.scores.items()},
        "per_class_iou": {
            **{f"{title} (train)": pseudo.scores[k]["per_class"] for k, title in facts.titles.items()},
            "segmentation (val)": result.scores["per_class"],
            "background only (val)": background["per_class"],
        },
        "failed_images": {"ingest": done.ingest.failed, "pseudo_labels": pseudo.failed, "evaluate": result.failed},
        "failures_uri": done.ingest.failures_uri,
        "stage_seconds": done.seconds(),
        "stage_uris": dict(facts.stage_uris),
    }


def failure_rows(ingest_failures: Sequence[Mapping[str, Any]], done: FinishedStages,
                 result: EvaluationResult) -> list[dict[str, str]]:
    """Every image a stage skipped (ingest's failures table, pseudo_labels', evaluate's): the report's table."""
    rows = [{"image_id": f["image_id"], "file": f["file"], "reason": f["reason"]} for f in ingest_failures]
    if done.pseudo_labels.failures_uri:
        table = storage.read_parquet(done.pseudo_labels.failures_uri).to_pylist()
        rows += [{"image_id": f["image_id"], "file": "pseudo_labels", "reason": f["reason"]} for f in table]
    rows += [{"image_id": f["image_id"], "file": "evaluate", "reason": f["reason"]} for f in result.failures]
    return rows


def _sample_panels(facts: RunFacts, samples: Sequence[ManifestRecord], samples_uri: str) -> list[dict[str, Any]]:
    """One row per training sample: the image, its ground truth, each scored pseudo-mask and the prediction."""
    panels = []
    for record in samples:
        image_id = record["image_id"]
        panels.append({"image_id": image_id, "image": read_image(record["image_uri"]), "columns": {
            "ground truth": read_label(record["mask_uri"]),
            **{title: read_label(storage.join(facts.stage_uris["pseudo_labels"], k, f"{image_id}.png"))
               for k, title in facts.titles.items()},
            "prediction": read_label(storage.join(samples_uri, f"{image_id}.png")),
        }})
    return panels


def write_run_report(report_uri: str, facts: RunFacts, done: FinishedStages, metrics: Mapping[str, Any],
                     samples: Sequence[ManifestRecord], samples_uri: str,
                     failures: list[dict[str, str]]) -> str:
    """The run's HTML report at ``report_uri``: headline numbers, IoU tables, training curves, the ``samples``
    (their predictions in ``samples_uri``) and the ``failures``; returns the report's URI."""
    pseudo = done.pseudo_labels
    summary_rows = {
        "segmentation val mIoU": metrics["val_miou"],
        "background-only val mIoU": metrics["background_only_miou"],
        **{f"pseudo-mask mIoU ({k})": v for k, v in metrics["pseudo_mask_miou"].items()},
        "train images": done.ingest.per_split.get(facts.train_split, 0),
        "val images": done.ingest.per_split.get(facts.val_split, 0),
        "failed images": sum(metrics["failed_images"].values()),
        "pseudo-labelling s/image": pseudo.mean_seconds_per_image,
        "pseudo-labelling images/s": pseudo.images_per_s,
        **{f"{k} seconds": v for k, v in metrics["stage_seconds"].items() if v is not None},
    }
    curves = {name: {key: [e.get(key) for e in trained.history] for key in ("loss", "val_miou")
                     if any(e.get(key) is not None for e in trained.history)}
              for name, trained in (("train_cls", done.train_cls), ("train_seg", done.train_seg))}
    return write_report(
        report_uri, title=f"wsss-ray: {facts.name}", summary=summary_rows,
        tables={"IoU per class": {k: v for k, v in metrics["per_class_iou"].items() if v}},
        samples=_sample_panels(facts, samples, samples_uri), curves=curves, failures=failures,
        class_names=facts.class_names,
        notes=["Pseudo-mask scores are on the training images (the WSSS convention); segmentation on val.",
               "Ground truth: " + ", ".join(f"{split} → {source}" for split, source in
                                            metrics["ground_truth"].items() if source) + " (255 = void, ignored).",
               "Pixels a pseudo-mask marks uncertain (255) count as background in its score."])
