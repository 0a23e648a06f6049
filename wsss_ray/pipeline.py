"""The whole pipeline: ingest → train_cls → pseudo_labels → train_seg → evaluate (+ report).

Each stage is a plain function of its inputs (``wsss_ray.stages``) writing below ``<output>/<stage>-<key>``; this
module keys the stages and chains them. A stage whose ``_SUCCESS.json`` exists is skipped, so re-running a
finished pipeline costs seconds and a killed one resumes: per-image stages skip finished images, training stages
resume from their last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from wsss_ray.core import storage
from wsss_ray.core.config_base import DatasetConfig, key_dump
from wsss_ray.core.progress import format_duration, log
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import class_names as dataset_class_names
from wsss_ray.models.card import ensure_model_card
from wsss_ray.pipeline_config import PipelineConfig, config_hash
from wsss_ray.report.console import print_results, print_stage_summary, stage_summary_line

STAGES = ("ingest", "train_cls", "pseudo_labels", "train_seg", "evaluate")


# What each stage does, in the one line the console starts it with.
STAGE_DOES = {
    "ingest": "checks every image and label, writes the manifest (bad files are listed, not fatal)",
    "train_cls": "trains the image-level classifier (Ray Train, DDP) whose CAMs seed the pseudo-masks",
    "pseudo_labels": "turns the classifier's CAMs into pseudo-masks for the training images (Ray Data)",
    "train_seg": "trains the segmentation network on the pseudo-masks (Ray Train, DDP)",
    "evaluate": "predicts val with the trained network, scores mIoU, writes the HTML report (Ray Data)",
}
RAY_LOGS_FILE = "ray_logs.txt"


def run_stage(stage: StageDir, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage unless it is complete; console: what it does, (its progress,) a summary, where it wrote."""
    if stage.is_complete():
        summary = stage.summary()
        log(stage.name, f"already complete, skipped: {stage_summary_line(summary)} ({stage.uri})")
        return summary
    log(stage.name, f"{STAGE_DOES.get(stage.name, 'running')} → {stage.uri}")
    # Ray's own logs (the workers' output) stay in Ray's session folder; the stage folder says where.
    from wsss_ray.core.ray_utils import ray_logs_dir

    storage.write_text(stage.path(RAY_LOGS_FILE), f"Ray's logs for this stage's run (the workers' stdout/stderr, "
                                                  f"Ray Data and Ray Train): {ray_logs_dir()}\n")
    stage.started = time.monotonic()
    summary = stage.complete(work())
    log(stage.name, f"done in {format_duration(summary['seconds'])}: {stage_summary_line(summary)}; results: "
                    f"{stage.uri} (Ray's logs: {RAY_LOGS_FILE} there)")
    return summary


def _without_workers(section: Any) -> dict[str, Any]:
    # The worker count and the speed options change speed, not results: a run resumed on another cluster size
    # (or with torch.compile on) keeps its outputs.
    return key_dump(section, exclude={"workers", "speed"})


def _model_sha(stage: StageDir) -> str | None:
    return stage.summary().get("model_sha256") if stage.is_complete() else None


def ingest_key(dataset: DatasetConfig) -> str:
    """The ingest stage's key: the dataset section without the toy generator's settings (they made the data, the
    data is what counts). ``val_ground_truth`` counts where it changes the manifest: on VOC with ``official``;
    ``aug`` reproduces the manifests made before the field existed, so it keeps their keys."""
    exclude = {"generate"}
    if dataset.format == "coco" or dataset.val_ground_truth == "aug":
        exclude.add("val_ground_truth")
    return config_hash(key_dump(dataset, exclude=exclude))


def stage_dirs(config: PipelineConfig) -> dict[str, StageDir]:
    """Stage directories keyed by their config, everything upstream, and the checkpoints they consume.

    A stage after a training stage is keyed by the trained weights' hash once that training is complete, so
    retrained weights never meet outputs made with other ones. Call again after a training stage finishes.
    """
    out = config.output
    dirs = {"ingest": StageDir.create(out, "ingest", ingest_key(config.dataset))}
    dirs["train_cls"] = StageDir.create(out, "train_cls", config_hash(
        dirs["ingest"].key, _without_workers(config.train_cls), config.dataset.supervision))
    dirs["pseudo_labels"] = StageDir.create(out, "pseudo_labels", config_hash(
        dirs["train_cls"].key, config.pseudo_labels.generator, _model_sha(dirs["train_cls"])))
    dirs["train_seg"] = StageDir.create(out, "train_seg", config_hash(
        dirs["pseudo_labels"].key, _without_workers(config.train_seg)))
    # use_gpu changes speed, not results (like the training stages' workers)
    dirs["evaluate"] = StageDir.create(out, "evaluate", config_hash(
        dirs["train_seg"].key, key_dump(config.evaluate, exclude={"use_gpu"}),
        _model_sha(dirs["train_seg"])))
    return dirs


def run_pipeline(config: PipelineConfig, until: str = "evaluate", verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage up to ``until``; returns the summaries, writes metrics.json and the report.
    ``verbose`` shows Ray's own logs on the console (see ``core.ray_utils.init_ray``)."""
    from wsss_ray.core.ray_utils import init_ray
    from wsss_ray.stages.evaluate import evaluate_and_report
    from wsss_ray.stages.ingest import build_manifest, ensure_dataset, load_manifest
    from wsss_ray.stages.pseudo_labels import generate_pseudo_labels, segmentation_records
    from wsss_ray.stages.train_cls import train_classifier
    from wsss_ray.stages.train_seg import train_segmentation

    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; expected one of {STAGES}")
    started = time.monotonic()
    init_ray(config.ray, verbose)
    ensure_dataset(config.dataset)
    dirs = stage_dirs(config)
    names = dataset_class_names(config.dataset.format)
    num_classes = len(names)
    ds = config.dataset
    summaries: dict[str, Any] = {}

    summaries["ingest"] = run_stage(dirs["ingest"], lambda: build_manifest(ds, dirs["ingest"]))
    train_records = load_manifest(dirs["ingest"], ds.train_split)
    val_records = load_manifest(dirs["ingest"], ds.val_split)
    if not train_records:
        raise RuntimeError(f"no usable training images in {ds.root} split {ds.train_split!r} "
                           f"(failures: {summaries['ingest']['failures_uri']})")
    if until == "ingest":
        return print_stage_summary(summaries)

    summaries["train_cls"] = run_stage(dirs["train_cls"], lambda: train_classifier(
        train_records, dirs["train_cls"], config.train_cls, num_classes, ds.supervision))
    if until == "train_cls":
        return print_stage_summary(summaries)
    dirs = stage_dirs(config)  # now keyed by the trained classifier

    summaries["pseudo_labels"] = run_stage(dirs["pseudo_labels"], lambda: generate_pseudo_labels(
        train_records, dirs["pseudo_labels"], model_uri=summaries["train_cls"]["model_uri"],
        cls_config=config.train_cls, config=config.pseudo_labels, num_classes=num_classes,
        supervision=ds.supervision, class_names=names))
    if until == "pseudo_labels":
        return print_stage_summary(summaries)

    seg_records = segmentation_records(train_records, dirs["pseudo_labels"], config)
    summaries["train_seg"] = run_stage(dirs["train_seg"], lambda: train_segmentation(
        seg_records, dirs["train_seg"], config.train_seg, num_classes, val_records, class_names=names))
    # Backfill for folders trained before train_seg wrote model.json: from the config that keys the folder.
    ensure_model_card(dirs["train_seg"].uri, config.train_seg.model, names)
    if until == "train_seg":
        return print_stage_summary(summaries)
    dirs = stage_dirs(config)

    have_mask = {r["image_id"] for r in seg_records}
    samples = [r for r in train_records if r["mask_uri"] and r["image_id"] in have_mask][: config.evaluate.num_samples]
    summaries["evaluate"] = run_stage(dirs["evaluate"], lambda: evaluate_and_report(
        config, dirs, summaries, val_records, samples, names))
    metrics = summaries["evaluate"]["metrics"]
    storage.write_json(storage.join(config.output, "metrics.json"), metrics)
    print_results(summaries, names, config.output, time.monotonic() - started)
    return summaries
