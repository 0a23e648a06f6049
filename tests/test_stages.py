"""Single stages on the local Ray cluster: COCO ingest, CLI dataset generation, training resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsss_ray.cli import main
from wsss_ray.core import storage
from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import read_label
from wsss_ray.pipeline_config import ClassifierTrainConfig
from wsss_ray.stages.ingest import build_manifest, load_failures, load_manifest
from wsss_ray.stages.train_cls import train_classifier

pytestmark = pytest.mark.integration


def test_cli_makes_identical_toy_datasets(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["make-toy-dataset", "--format", "coco", "--out", str(tmp_path / name), "--num-train", "4",
                     "--num-val", "2", "--image-size", "48", "--seed", "7"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("annotations/instances_train2014.json") in files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_coco_ingest_on_ray_renders_masks_and_reports_bad_items(ray_cluster: None, tmp_path: Path) -> None:
    from wsss_ray.data.toy import make_toy_dataset

    make_toy_dataset(str(tmp_path / "coco"), fmt="coco", num_train=10, num_val=3, image_size=48, seed=2)
    broken = min((tmp_path / "coco" / "train2014").iterdir())
    broken.write_bytes(b"not a jpeg")
    config = DatasetConfig(format="coco", root=str(tmp_path / "coco"), train_split="train2014", val_split="val2014")
    stage = StageDir.create(str(tmp_path / "out"), "ingest", "coco")
    summary = build_manifest(config, stage)
    assert summary["records"] == 12 and summary["failed"] == 1
    assert load_failures(stage)[0]["file"].endswith(broken.name)
    for record in load_manifest(stage, "train2014"):
        mask = read_label(record["mask_uri"])
        assert mask.shape == (record["height"], record["width"])
        labels = set(np.unique(mask).tolist()) - {0, 255}
        assert labels == set(record["tags"]) and all(1 <= t <= 80 for t in labels)


def test_classifier_training_resumes_from_its_checkpoint(ray_cluster: None, s3_prefix: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from wsss_ray.data.toy import make_toy_dataset

    make_toy_dataset(str(tmp_path / "voc"), num_train=8, num_val=2, image_size=48, num_classes=2, seed=1)
    stage = StageDir.create(s3_prefix, "ingest", "voc")
    build_manifest(DatasetConfig(root=str(tmp_path / "voc"), train_split="train", val_split="val"), stage)
    records = load_manifest(stage, "train")
    base: dict[str, Any] = {"backbone": {"name": "resnet_tiny"}, "batch_size": 4,
                            "augment": {"crop_size": 48, "scale_min": 1.0, "scale_max": 1.0},
                            # one worker: resuming is under test (a two-worker group resumes in test_training_methods)
                            "workers": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0}}
    train_stage = StageDir.create(s3_prefix, "train_cls", "resume")
    first = train_classifier(records, train_stage, ClassifierTrainConfig.model_validate({**base, "epochs": 1}), 21,
                             "tags")
    # The same run directory with a longer schedule: Ray Train restores the run and the loop continues at
    # epoch 2 instead of starting over (what a re-run after a killed job does).
    two_epochs = ClassifierTrainConfig.model_validate({**base, "epochs": 2})
    second = train_classifier(records, train_stage, two_epochs, 21, "tags")
    assert [e["epoch"] for e in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]
    assert storage.exists(train_stage.path("model.pt"))
    # Once more, with nothing left to train (a run whose driver was killed after the last checkpoint): no epoch
    # is trained, yet the run's callbacks hear the last epoch's metrics again, as a Tune trial that never
    # recorded them must (the console callback's line here; a trial's TuneReportCallback gets the same report).
    capsys.readouterr()
    third = train_classifier(records, train_stage, two_epochs, 21, "tags")
    assert third["history"] == second["history"] and third["model_sha256"] == second["model_sha256"]
    last = second["history"][-1]
    lines = [line for line in capsys.readouterr().err.splitlines() if f"[{train_stage.name}] epoch" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"[{train_stage.name}] epoch 2/2: loss {last['loss']:.3g}, ") and \
        lines[0].endswith(", last epoch"), lines
