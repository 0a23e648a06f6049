"""The whole pipeline on a real local Ray cluster, with every output on the loopback S3 server.

One tiny run (generated VOC data with one corrupt image; conftest's session ``reference_pipeline``) is shared by
the tests below: they check the stage outputs in S3, the report, skipping on re-run, resuming a half-done
pseudo-labelling stage, and that the stage's CRF output equals a direct pydensecrf call on the same CAMs.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kill_worker_when
from pydensecrf import densecrf
from pydensecrf.utils import unary_from_softmax

from wsss_ray.core import storage
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.maths.inference import multiscale_cams
from wsss_ray.pipeline import STAGE_DOES, run_pipeline, stage_dirs
from wsss_ray.stages.ingest import load_manifest
from wsss_ray.stages.pseudo_labels import generate_pseudo_labels, load_classifier, read_stats

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline_run(reference_pipeline: dict[str, Any]) -> dict[str, Any]:
    """The session's tiny reference run (conftest), made on first use; test_sweep builds on the same stages."""
    return reference_pipeline


LINES = re.MULTILINE


def test_default_console_shows_stages_not_ray_internals(pipeline_run: dict[str, Any]) -> None:
    lines = pipeline_run["console"].splitlines()
    text = "\n".join(lines)
    # Ray's worker-prefixed lines ("(RayTrainWorker pid=...)", "(SplitCoordinator pid=...)") and its INFO logs
    for marker in ("RayTrainWorker", "SplitCoordinator", "TrainController", "pid=", "Execution plan",
                   "Reporting training result"):
        assert marker not in text, marker
    for stage in ("ingest", "train_cls", "pseudo_labels", "train_seg", "evaluate"):
        mine = [line for line in lines if line.startswith(f"[{stage}] ")]
        assert any(STAGE_DOES[stage] in line for line in mine), stage  # what it does
        assert any(line.startswith(f"[{stage}] done in ") for line in mine), stage  # its summary
        assert any("results: " in line for line in mine), stage  # where its results are
    # per-epoch lines from the driver (Ray Train callback), with throughput and an ETA before the last epoch
    for stage in ("train_cls", "train_seg"):
        assert re.search(rf"^\[{stage}\] epoch 1/2: loss [0-9.e+-]+, .*[0-9.]+ images/s(, [0-9]+% waiting on input)?, ETA \S+$", text, LINES), stage
        assert re.search(rf"^\[{stage}\] epoch 2/2: .*last epoch$", text, LINES), stage
    assert re.search(r"^\[train_seg\] epoch 2/2: loss [0-9.e+-]+, val mIoU [0-9.]+, ", text, LINES)
    # per-image stages: count, throughput and (at the end) done
    for stage in ("pseudo_labels", "evaluate"):
        assert re.search(rf"^\[{stage}\] \d+/\d+ images \(100%\), [0-9.]+ images/s, done", text, LINES), stage
    assert len(lines) < 60, text
    ray_logs = storage.read_text(storage.join(pipeline_run["summaries"]["train_seg"]["uri"], "ray_logs.txt"))
    assert "/logs" in ray_logs


def test_every_stage_completes_on_s3(pipeline_run: dict[str, Any]) -> None:
    config = pipeline_run["config"]
    for name, stage in stage_dirs(config).items():
        assert stage.uri.startswith("s3://"), name
        assert stage.is_complete(), name
    metrics = storage.read_json(storage.join(config.output, "metrics.json"))
    assert 0.0 <= metrics["val_miou"] <= 1.0
    assert set(metrics["pseudo_mask_miou"]) == {"cam", "pseudo"}
    assert metrics["ground_truth"] == {"train": "SegmentationClassAug", "val": "SegmentationClass"}
    # background-only: IoU(bg) = bg pixels / all labelled pixels, divided by the number of classes present.
    assert 0.0 < metrics["background_only_miou"] < 0.5
    report = storage.read_text(pipeline_run["summaries"]["evaluate"]["report_uri"])
    assert "IoU per class" in report and "aeroplane" in report
    # evaluate keeps the scored val predictions and the report's train samples apart (issue 16)
    evaluate = stage_dirs(config)["evaluate"]
    val_ids = {r["image_id"] for r in load_manifest(stage_dirs(config)["ingest"], "val")}
    predicted = {u.rsplit("/", 1)[-1][:-4] for u in storage.list_files(evaluate.path("predictions"), suffix=".png")}
    samples = {u.rsplit("/", 1)[-1][:-4] for u in storage.list_files(evaluate.path("samples"), suffix=".png")}
    assert predicted == val_ids
    assert len(samples) == config.evaluate.num_samples and not samples & val_ids
    assert samples <= set(pipeline_run["ids"])  # training images


def test_bad_image_is_reported_and_skipped(pipeline_run: dict[str, Any]) -> None:
    dirs = stage_dirs(pipeline_run["config"])
    failures = storage.read_parquet(dirs["ingest"].path("failures.parquet")).to_pylist()
    assert [f["image_id"] for f in failures] == [pipeline_run["corrupt"]]
    assert failures[0]["file"].endswith(f"{pipeline_run['corrupt']}.jpg")
    train = load_manifest(dirs["ingest"], "train")
    assert len(train) == len(pipeline_run["ids"]) - 1
    pseudo = storage.list_files(dirs["pseudo_labels"].path("pseudo"), suffix=".png")
    assert len(pseudo) == len(train)
    for record in train[:3]:
        mask = read_label(dirs["pseudo_labels"].path("pseudo", f"{record['image_id']}.png"))
        assert mask.shape == (record["height"], record["width"])
        assert set(np.unique(mask)) <= {0, 255, *record["tags"]}


def test_rerun_skips_finished_stages(pipeline_run: dict[str, Any]) -> None:
    config = pipeline_run["config"]
    before = storage.read_json(stage_dirs(config)["train_seg"].path("_SUCCESS.json"))
    start = time.monotonic()
    summaries = run_pipeline(config)
    assert time.monotonic() - start < pipeline_run["seconds"] / 3
    assert summaries["train_seg"] == before


def test_half_done_pseudo_labelling_resumes(pipeline_run: dict[str, Any], s3_prefix: str) -> None:
    config = pipeline_run["config"]
    dirs = stage_dirs(config)
    records = load_manifest(dirs["ingest"], "train")
    stage = StageDir.create(s3_prefix, "pseudo_labels", "resume")
    kwargs = {"model_uri": pipeline_run["summaries"]["train_cls"]["model_uri"], "cls_config": config.train_cls,
              "config": config.pseudo_labels, "num_classes": 21, "supervision": "tags",
              "class_names": VOC_CLASSES}
    generate_pseudo_labels(records[:6], stage, **kwargs)  # as if killed after six images
    first = {uri: storage.read_bytes(uri) for uri in storage.list_files(stage.path("pseudo"))}
    summary = generate_pseudo_labels(records, stage, **kwargs)
    assert summary["written"] == len(records) and len(read_stats(stage)) == len(records)
    assert sorted(r["image_id"] for r in read_stats(stage)) == sorted(r["image_id"] for r in records)
    # the resumed run gives byte-identical masks to the uninterrupted one
    for record in records:
        resumed = storage.read_bytes(stage.path("pseudo", f"{record['image_id']}.png"))
        original = storage.read_bytes(dirs["pseudo_labels"].path("pseudo", f"{record['image_id']}.png"))
        assert resumed == original, record["image_id"]
    assert all(storage.read_bytes(uri) == data for uri, data in first.items())


def test_stage_crf_equals_direct_pydensecrf(pipeline_run: dict[str, Any]) -> None:
    config = pipeline_run["config"]
    dirs = stage_dirs(config)
    record = next(r for r in load_manifest(dirs["ingest"], "train") if r["tags"])
    model = load_classifier(pipeline_run["summaries"]["train_cls"]["model_uri"], config.train_cls, 21)
    image = read_image(record["image_uri"])
    gen = config.pseudo_labels.generator
    # The stage ships CAMs as float16 between the model actor and the CRF task.
    cams = multiscale_cams(model, image, record["tags"], gen.scales, gen.flip).astype(np.float16).astype(np.float32)
    probs = np.concatenate([np.full((1, *cams.shape[1:]), gen.bg_score, np.float32), cams])
    probs = np.clip(probs / probs.sum(0, keepdims=True), 1e-5, 1.0)
    h, w = image.shape[:2]
    crf = densecrf.DenseCRF2D(w, h, len(probs))
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=gen.crf.gaussian_sxy, compat=gen.crf.gaussian_compat)
    crf.addPairwiseBilateral(sxy=gen.crf.bilateral_sxy, srgb=gen.crf.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=gen.crf.bilateral_compat)
    q = np.array(crf.inference(gen.crf.iterations)).reshape(len(probs), h, w)
    expected = np.array([0, *record["tags"]], np.uint8)[q.argmax(0)]
    stored = read_label(dirs["pseudo_labels"].path("pseudo", f"{record['image_id']}.png"))
    assert (stored == expected).mean() > 0.999


def test_report_pictures_exist(pipeline_run: dict[str, Any], tmp_path: Path) -> None:
    report_uri = pipeline_run["summaries"]["evaluate"]["report_uri"]
    report_dir = report_uri.rsplit("/", 1)[0]
    pngs = storage.list_files(report_dir, suffix=".png")
    assert any("overlays" in uri for uri in pngs) and any(uri.endswith("curves.png") for uri in pngs)
    from PIL import Image

    assert Image.open(io.BytesIO(storage.read_bytes(pngs[0]))).size[0] > 64


def test_killed_worker_mid_stage_still_completes_identically(pipeline_run: dict[str, Any], s3_prefix: str) -> None:
    """SIGKILL the model actor's process while the stage runs: Ray restarts it and retries its tasks; the stage
    ends with exactly one mask per image, byte-identical to an uninterrupted run."""
    import threading

    config = pipeline_run["config"]
    dirs = stage_dirs(config)
    records = load_manifest(dirs["ingest"])  # train + val: more work, so the kill lands mid-stage
    pseudo = config.pseudo_labels.model_copy(update={"generator": config.pseudo_labels.generator.model_copy(
        update={"scales": [1.0, 0.75, 1.25, 1.5]})})
    kwargs = {"model_uri": pipeline_run["summaries"]["train_cls"]["model_uri"], "cls_config": config.train_cls,
              "config": pseudo, "num_classes": 21, "supervision": "tags", "class_names": VOC_CLASSES}
    clean = StageDir.create(s3_prefix, "pseudo_labels", "clean")
    generate_pseudo_labels(records, clean, **kwargs)

    killed = StageDir.create(s3_prefix, "pseudo_labels", "killed")
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(generate_pseudo_labels(records, killed, **kwargs)))
    runner.start()
    victims = kill_worker_when("CamActor", lambda: bool(storage.list_files(killed.path("pseudo"))),
                               runner.is_alive, timeout_s=60)
    runner.join(timeout=300)
    assert victims, "the stage finished before a worker could be killed"
    assert result["written"] == len(records) and result["failed"] == 0
    done = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(killed.path("pseudo"))}
    assert done == {f"{r['image_id']}.png" for r in records}
    for name in sorted(done):
        assert storage.read_bytes(killed.path("pseudo", name)) == storage.read_bytes(clean.path("pseudo", name))

