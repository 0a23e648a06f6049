"""A run's metrics and HTML report (``report/run.py``) from the stages' typed results, without Ray or a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from wsss_ray.core import storage
from wsss_ray.core.results import (
    EvaluationResult,
    FinishedStages,
    IngestResult,
    PseudoLabelResult,
    ReportedRun,
    TrainingResult,
)
from wsss_ray.report.run import RunFacts, failure_rows, run_metrics, write_run_report

NAMES = ["background", "cat"]


def _scores(miou: float) -> dict[str, object]:
    return {"miou": miou, "per_class": {"background": miou, "cat": miou}}


def _finished(tmp_path: Path) -> FinishedStages:
    failures = str(tmp_path / "pseudo_failures.parquet")
    storage.write_parquet(failures, pa.Table.from_pylist([{"image_id": "t9", "reason": "cannot decode"}]))
    return FinishedStages(
        IngestResult({"train": 3, "val": 2}, failed=1, failures_uri="ingest/failures.parquet", seconds=1.0),
        TrainingResult("cls/model.pt", "a" * 64, ({"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.5}), 2.0),
        PseudoLabelResult({"pseudo": _scores(0.5), "cam": _scores(0.25)}, failed=1, failures_uri=failures,
                          mean_seconds_per_image=0.1, images_per_s=10.0, seconds=3.0, written=2),
        TrainingResult("seg/model.pt", "b" * 64, ({"epoch": 1, "loss": 0.7, "val_miou": 0.4},), None),
    )


def _facts(tmp_path: Path) -> RunFacts:
    return RunFacts(name="tiny", train_split="train", val_split="val", class_names=NAMES,
                    titles={"pseudo": "pseudo-mask", "cam": "thresholded CAM"},
                    stage_uris={"pseudo_labels": str(tmp_path / "pseudo_labels-k")})


# ground truth background: 10 pixels (8 right), cat: 5 pixels (4 right)
EVALUATED = EvaluationResult(scores=_scores(0.6), scores_raw=_scores(0.55), confusion=[[8, 2], [1, 4]], images=2,
                             failed=1, failures=({"image_id": "v2", "reason": "truncated"},))


def test_metrics_hold_every_stage_result_and_the_background_only_baseline(tmp_path: Path) -> None:
    metrics = run_metrics(_facts(tmp_path), _finished(tmp_path), EVALUATED)
    assert metrics["val_miou"] == 0.6 and metrics["val_miou_without_crf"] == 0.55
    # background everywhere: background IoU 10/15, cat 0
    assert metrics["background_only_miou"] == pytest.approx((10 / 15 + 0) / 2)
    assert metrics["per_class_iou"]["background only (val)"] == {"background": pytest.approx(10 / 15), "cat": 0.0}
    assert list(metrics["per_class_iou"]) == ["pseudo-mask (train)", "thresholded CAM (train)",
                                              "segmentation (val)", "background only (val)"]
    assert metrics["pseudo_mask_miou"] == {"pseudo": 0.5, "cam": 0.25}
    assert metrics["failed_images"] == {"ingest": 1, "pseudo_labels": 1, "evaluate": 1}
    assert metrics["stage_seconds"] == {"ingest": 1.0, "train_cls": 2.0, "pseudo_labels": 3.0, "train_seg": None}
    assert metrics["failures_uri"] == "ingest/failures.parquet"


def test_report_lists_every_stages_failures_and_shows_the_samples(tmp_path: Path) -> None:
    facts, done = _facts(tmp_path), _finished(tmp_path)
    rows = failure_rows([{"image_id": "t1", "split": "train", "file": "t1.jpg", "reason": "truncated"}], done,
                        EVALUATED)
    assert [(r["image_id"], r["file"]) for r in rows] == [("t1", "t1.jpg"), ("t9", "pseudo_labels"),
                                                          ("v2", "evaluate")]
    image, label = tmp_path / "t2.jpg", tmp_path / "t2.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(label)
    for folder in ("pseudo", "cam"):
        storage.write_bytes(storage.join(facts.stage_uris["pseudo_labels"], folder, "t2.png"), label.read_bytes())
    storage.write_bytes(str(tmp_path / "samples" / "t2.png"), label.read_bytes())
    sample = {"image_id": "t2", "split": "train", "image_uri": str(image), "height": 8, "width": 8, "tags": [1],
              "boxes": [], "mask_uri": str(label), "scribble_uri": None}
    metrics = {**run_metrics(facts, done, EVALUATED), "ground_truth": {"train": "SegmentationClassAug"}}
    uri = write_run_report(str(tmp_path / "report"), facts, done, metrics, [sample], str(tmp_path / "samples"),
                           rows)
    html = Path(uri).read_text()
    assert "wsss-ray: tiny" in html and "t9" in html and "truncated" in html and "t2" in html
    assert "train → SegmentationClassAug" in html
    run = ReportedRun(metrics, uri, EVALUATED.images)
    assert ReportedRun.from_summary(run.summary()) == run
