"""The whole pipeline: ingest → train_cls → pseudo_labels → train_seg → evaluate (+ report).

Each stage is a plain function of its inputs (``wsss_ray.stages``) writing below ``<output>/<stage>-<key>``; the
wiring (``wsss_ray/wiring.py``) keys the stages and builds each one's inputs from the stages finished before it,
and this module runs them in turn. A stage whose ``_SUCCESS.json`` exists is skipped, so re-running a finished
pipeline costs seconds and a killed one resumes: per-image stages skip finished images, training stages resume
from their last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from wsss_ray.core import storage
from wsss_ray.core.progress import format_duration, log
from wsss_ray.core.results import FinishedStages, ReportedRun
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.models.card import ensure_model_card
from wsss_ray.pipeline_config import PipelineConfig
from wsss_ray.report.console import print_results, print_stage_summary, stage_summary_line
from wsss_ray.report.run import RunFacts, failure_rows, run_metrics, write_run_report
from wsss_ray.wiring import STAGES, StageWiring, ingest_key, stage_dirs, stages_until

# The stage keys and folders are the wiring's; named here too, where the pipeline's users have imported them.
__all__ = ["STAGES", "STAGE_DOES", "StageWiring", "ingest_key", "run_pipeline", "run_stage", "run_stages",
           "stage_dirs"]


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


# ------------------------------------------------------------------------------------------------- stage work
# What each stage does with its wiring; the stage's own function (``wsss_ray.stages``) does the work.


def _ingest(wiring: StageWiring) -> dict[str, Any]:
    from wsss_ray.stages.ingest import build_manifest

    return build_manifest(wiring.config.dataset, wiring.dirs["ingest"])


def _train_cls(wiring: StageWiring) -> dict[str, Any]:
    return wiring.classifier_inputs().train(wiring.dirs["train_cls"], wiring.config)


def _pseudo_labels(wiring: StageWiring) -> dict[str, Any]:
    return wiring.pseudo_label_inputs().generate(wiring.dirs["pseudo_labels"], wiring.config)


def _train_seg(wiring: StageWiring) -> dict[str, Any]:
    return wiring.segmentation_inputs().train(wiring.dirs["train_seg"], wiring.config)


def _evaluate(wiring: StageWiring) -> dict[str, Any]:
    """Evaluate the segmenter, then the run's ``metrics.json`` (in the stage's folder) and its HTML report."""
    from wsss_ray.stages.evaluate import ground_truth
    from wsss_ray.stages.ingest import load_failures

    config, stage, inputs = wiring.config, wiring.dirs["evaluate"], wiring.evaluation_inputs()
    result = inputs.evaluate(stage, config)
    facts = RunFacts(name=config.name, train_split=config.dataset.train_split, val_split=config.dataset.val_split,
                     class_names=wiring.class_names, titles=_scored_titles(config, inputs.finished),
                     stage_uris={k: v.uri for k, v in wiring.dirs.items()})
    metrics = run_metrics(facts, inputs.finished, result)
    metrics["ground_truth"] = ground_truth(config, wiring.manifest())  # the manifest the wiring read once
    storage.write_json(stage.path("metrics.json"), metrics)
    failures = failure_rows(load_failures(wiring.dirs["ingest"]), inputs.finished, result)
    report_uri = write_run_report(stage.path("report"), facts, inputs.finished, metrics, inputs.samples,
                                  result.samples_uri, failures)
    return ReportedRun(metrics, report_uri, result.images).summary()


def _scored_titles(config: PipelineConfig, finished: FinishedStages) -> dict[str, str]:
    """The scored pseudo-label outputs → their display names, in the generator's display order."""
    from wsss_ray.methods.registry import GENERATORS

    titles = GENERATORS.implementation(config.pseudo_labels.generator.name).titles
    return {k: v for k, v in titles.items() if k in finished.pseudo_labels.scores}


STAGE_WORK: dict[str, Callable[[StageWiring], dict[str, Any]]] = {
    "ingest": _ingest, "train_cls": _train_cls, "pseudo_labels": _pseudo_labels, "train_seg": _train_seg,
    "evaluate": _evaluate,
}


def _after(wiring: StageWiring, name: str) -> None:
    """Checks and backfills once a stage is finished (run now or earlier)."""
    if name == "ingest":
        wiring.train_records()  # no usable training image is an error here, before any training
    elif name == "train_seg":
        # Backfill for folders trained before train_seg wrote model.json: from the config that keys the folder.
        ensure_model_card(wiring.dirs["train_seg"].uri, wiring.config.train_seg.model, wiring.class_names)


# ------------------------------------------------------------------------------------------------- the pipeline


def run_stages(config: PipelineConfig, until: str = "evaluate", verbose: bool = False) -> StageWiring:
    """Run (or resume) every stage up to ``until`` in turn; returns the wiring, holding every finished stage.
    ``verbose`` shows Ray's own logs on the console (see ``core.ray_utils.init_ray``)."""
    from wsss_ray.core.ray_utils import init_ray
    from wsss_ray.stages.ingest import ensure_dataset

    names = stages_until(until)  # an unknown name fails before Ray starts
    init_ray(config.ray, verbose)
    ensure_dataset(config.dataset)
    wiring = StageWiring(config)
    for name in names:
        wiring.finish(name, run_stage(wiring.dirs[name], partial(STAGE_WORK[name], wiring)))
        _after(wiring, name)
    return wiring


def run_pipeline(config: PipelineConfig, until: str = "evaluate", verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage up to ``until``; returns the stages' summaries (as their ``_SUCCESS.json``
    holds them), writes metrics.json and the report."""
    started = time.monotonic()
    wiring = run_stages(config, until, verbose)
    if until != "evaluate":
        return print_stage_summary(wiring.summaries)
    storage.write_json(storage.join(config.output, "metrics.json"), wiring.reported().metrics)
    print_results(wiring.summaries, wiring.class_names, config.output, time.monotonic() - started)
    return wiring.summaries
