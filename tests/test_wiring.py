"""The one wiring (``wsss_ray/wiring.py``): each stage's folder and inputs, built from finished-stage records.

The finished stages here are written by hand (a manifest, ``_SUCCESS.json`` summaries, pseudo-mask files), so
the test needs no Ray: only the local storage the stages use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from wsss_ray.core import storage
from wsss_ray.core.results import FinishedStages, TrainingResult
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.pipeline_config import PipelineConfig, parse_config
from wsss_ray.stages.ingest import FAILURES_SCHEMA, MANIFEST_SCHEMA
from wsss_ray.wiring import (
    STAGES,
    EvaluationInputs,
    PseudoLabelInputs,
    SegmentationInputs,
    StageWiring,
    stage_dirs,
)


def _config(tmp_path: Path, **sections: Any) -> PipelineConfig:
    dataset = {"root": str(tmp_path / "voc"), "train_split": "train", "val_split": "val"}
    return parse_config({"output": str(tmp_path / "out"), "dataset": dataset, "evaluate": {"num_samples": 2},
                         **sections}, source="wiring test")


def _record(image_id: str, split: str, mask: bool = True) -> dict[str, Any]:
    return {"image_id": image_id, "split": split, "image_uri": f"/data/{image_id}.jpg", "height": 8, "width": 8,
            "tags": [1], "boxes": [], "mask_uri": f"/data/{image_id}.png" if mask else None, "scribble_uri": None}


def _finish(stage: StageDir, **summary: Any) -> dict[str, Any]:
    return stage.complete(summary)


def _ingest(stage: StageDir, records: list[dict[str, Any]]) -> dict[str, Any]:
    storage.write_parquet(stage.path("manifest.parquet"), pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA))
    storage.write_parquet(stage.path("failures.parquet"), pa.Table.from_pylist([], schema=FAILURES_SCHEMA))
    per_split = {split: sum(r["split"] == split for r in records) for split in ("train", "val")}
    return _finish(stage, images=len(records), records=len(records), per_split=per_split, failed=0,
                   failures_uri=stage.path("failures.parquet"), manifest_uri=stage.path("manifest.parquet"))


def _trained(stage: StageDir, sha: str) -> dict[str, Any]:
    return _finish(stage, model_uri=stage.path("model.pt"), model_sha256=sha, history=[{"epoch": 1, "loss": 0.5}])


RECORDS = [_record("t1", "train"), _record("t2", "train", mask=False), _record("t3", "train"),
           _record("t4", "train"), _record("v1", "val")]


def _run_to_pseudo_labels(tmp_path: Path) -> tuple[PipelineConfig, dict[str, dict[str, Any]]]:
    """Finished ingest, train_cls and pseudo_labels folders (t3 failed in pseudo_labels: no mask file)."""
    config = _config(tmp_path)
    summaries = {"ingest": _ingest(stage_dirs(config)["ingest"], RECORDS),
                 "train_cls": _trained(stage_dirs(config)["train_cls"], "a" * 64)}
    pseudo = stage_dirs(config)["pseudo_labels"]  # keyed by the classifier's weights now
    for image_id in ("t1", "t2", "t4"):
        storage.write_bytes(pseudo.path("pseudo", f"{image_id}.png"), b"png")
    summaries["pseudo_labels"] = _finish(pseudo, images=4, written=3, failed=1, failures_uri=None,
                                         scores={"pseudo": {"miou": 0.5, "per_class": {}}})
    return config, summaries


def test_a_stage_that_has_not_finished_is_an_error_naming_its_folder(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(RuntimeError, match=r"stage ingest has not finished in .*/out/ingest-"):
        StageWiring.finished(config, "pseudo_labels")
    wiring = StageWiring(config)
    with pytest.raises(RuntimeError, match="stage train_cls has not finished"):
        wiring.trained("train_cls")
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        StageWiring.finished(config, "nope")
    with pytest.raises(ValueError, match="no inputs for stage 'ingest'"):
        wiring.inputs("ingest")


def test_pseudo_labels_and_train_seg_inputs_come_from_the_finished_stages(tmp_path: Path) -> None:
    config, summaries = _run_to_pseudo_labels(tmp_path)
    wiring = StageWiring.finished(config, "pseudo_labels")
    assert wiring.summaries == summaries and list(wiring.summaries) == list(STAGES[:3])
    assert wiring.dirs["pseudo_labels"].uri == stage_dirs(config)["pseudo_labels"].uri

    labels = wiring.inputs("pseudo_labels")
    assert isinstance(labels, PseudoLabelInputs)
    assert labels.classifier == TrainingResult.from_summary(summaries["train_cls"])
    assert labels.classifier.model_uri.endswith("/model.pt") and "/train_cls-" in labels.classifier.model_uri
    assert [r["image_id"] for r in labels.records] == ["t1", "t2", "t3", "t4"]
    assert [r["image_id"] for r in wiring.pseudo_label_inputs(max_images=2).records] == ["t1", "t2"]
    assert labels.class_names == wiring.class_names and wiring.class_names[0] == "background"

    training = wiring.inputs("train_seg")
    assert isinstance(training, SegmentationInputs)
    # t3 has no pseudo-mask (it failed in pseudo_labels): it is not a training row
    assert [r["image_id"] for r in training.records] == ["t1", "t2", "t4"]
    assert training.records[0]["label_uri"] == wiring.dirs["pseudo_labels"].path("pseudo", "t1.png")
    assert [r["image_id"] for r in training.val_records] == ["v1"]
    assert wiring.pseudo_labelled().written == 3


def test_evaluate_inputs_and_the_rekeyed_evaluate_folder(tmp_path: Path) -> None:
    config, _ = _run_to_pseudo_labels(tmp_path)
    wiring = StageWiring.finished(config, "pseudo_labels")
    evaluate_before = wiring.dirs["evaluate"].uri
    wiring.finish("train_seg", _trained(wiring.dirs["train_seg"], "b" * 64))
    assert wiring.dirs["evaluate"].uri != evaluate_before  # keyed by the segmenter's weights once trained

    inputs = wiring.inputs("evaluate")
    assert isinstance(inputs, EvaluationInputs)
    assert inputs.segmenter.model_sha256 == "b" * 64
    assert isinstance(inputs.finished, FinishedStages) and inputs.finished.train_cls.model_sha256 == "a" * 64
    # report samples: training images with ground truth and a pseudo-mask (t2 has no ground truth, t3 no mask)
    assert [r["image_id"] for r in inputs.samples] == ["t1", "t4"]
    assert [r["image_id"] for r in inputs.val_records] == ["v1"]
    assert inputs.finished.ingest.per_split == {"train": 4, "val": 1}


def test_no_usable_training_image_is_an_error_naming_the_split(tmp_path: Path) -> None:
    config = _config(tmp_path)
    wiring = StageWiring(config)
    wiring.finish("ingest", _ingest(wiring.dirs["ingest"], [_record("v1", "val")]))
    with pytest.raises(RuntimeError, match=r"no usable training images in .*voc split 'train' \(failures: "):
        wiring.classifier_inputs()
    assert [r["image_id"] for r in wiring.val_records()] == ["v1"]
