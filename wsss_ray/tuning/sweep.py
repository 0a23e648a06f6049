"""Run a search space as a Ray Tune experiment, resumably, with results, a report and TensorBoard logs.

The shared inputs (ingest, classifier, pseudo-labels of the base config) are made once by the pipeline, then
each Tune trial runs one stage with the trial's values:

- ``train_seg`` trials: a driver function that fits the segmentation trainer (its own Ray Train run, named after
  the trial id, checkpointed below ``<output>/sweeps/<name>/trials/<trial_id>``) and forwards every epoch's
  metrics to Tune through ``TuneReportCallback``, so ASHA can stop weak trials after a few epochs;
- ``pseudo_labels`` trials: a plain function that labels the training images with the trial's generator
  settings (e.g. CRF parameters) and reports the pseudo-mask scores once;
- ``relabel_train_seg`` trials: both in turn, for generator settings that only show in training (CDSP's distance
  maps): the trial relabels the training images into its own folder, then trains on those masks as a train_seg
  trial does, reporting every epoch (ASHA works as for train_seg).

Everything lives below ``<output>/sweeps/<name>``: Tune's experiment (resumed by ``Tuner.restore`` when the sweep
is run again), one folder per trial, ``results.json`` and ``report/report.html``. Tune's TensorBoard logger
writes each trial's event files there, so ``tensorboard --logdir <output>/sweeps/<name>`` shows every trial.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from wsss_ray.core import storage
from wsss_ray.core.progress import log
from wsss_ray.core.ray_utils import cluster_address, cluster_autoscales, cluster_cpus, cluster_gpus
from wsss_ray.core.records import ManifestRecord
from wsss_ray.core.resources import plan_actor_pool, plan_workers
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.pipeline_config import ConfigError, PipelineConfig, config_hash
from wsss_ray.tuning.space import (
    EPOCH_TRIALS,
    TRIAL_METRICS,
    SearchSpace,
    load_space,
    param_overrides,
    trial_config,
)
from wsss_ray.wiring import PseudoLabelInputs, SegmentationInputs, StageWiring

# A trial's function only coordinates: a train_seg trial waits on its Ray Train run (whose workers have their own
# placement group), a pseudo_labels trial on a Ray Data pipeline (relabel_train_seg: one, then the other). So trials hold no CPU: any CPU they held would
# be missing for Ray Data's 1-CPU ingest tasks, and on a 2-CPU machine (where an earlier stage's finished Ray
# Train run can still hold its 0.5-CPU placement group) a 0.5-CPU driver left them unschedulable: a hang. Tune
# refuses an empty bundle (``{"cpu": 0}``), hence a token amount of logical memory.
TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}
# CPU a train_seg trial is counted with when sizing concurrency, on top of its workers: the driver's own work
# and its share of the ingest tasks.
TRAIN_DRIVER_CPUS = 0.5
# How often the driver uploads Tune's experiment state (and trial logs) to storage: the most a killed sweep
# can lose of its bookkeeping. Trials' own Ray Train checkpoints are uploaded every epoch regardless.
SYNC_PERIOD_S = 30
# Restarts of a trial whose own process died (its node was lost) before the trial is marked ERROR.
TRIAL_RESTARTS = 2
RESULTS_FILE = "results.json"
# A relabel_train_seg trial's pseudo-label summary (scores against the ground truth), next to its masks.
RELABEL_FILE = "pseudo_labels.json"
FINGERPRINT_FILE = "space.json"


# ------------------------------------------------------------------------------------------------- trials


def _trial_stage(sweep_uri: str, trial_kind: str) -> StageDir:
    """The trial's own folder; the Ray Train run name carries the trial id, which survives ``Tuner.restore``."""
    trial_id = tune.get_context().get_trial_id()
    return StageDir(f"{trial_kind}-{trial_id}", storage.join(sweep_uri, "trials", trial_id), trial_id)


def train_seg_trial(params: dict[str, Any], *, base: dict[str, Any], inputs: SegmentationInputs,
                    sweep_uri: str) -> None:
    """One train_seg trial: a Ray Train run whose epoch metrics reach Tune through ``TuneReportCallback``.

    Run again after a restore, the same run name resumes from the trial's latest Ray Train checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    ray.data.DataContext.get_current().enable_progress_bars = False
    config = trial_config(base, params, source=f"trial {tune.get_context().get_trial_id()}")
    stage = _trial_stage(sweep_uri, "train_seg")
    summary = inputs.train(stage, config, callbacks=[TuneReportCallback()], model_card=False)
    storage.write_json(stage.path("summary.json"), {"params": params, "finished_at": time.time(), **summary})


def _generate_outside_trial(inputs: PseudoLabelInputs, stage: StageDir, config: PipelineConfig) -> dict[str, Any]:
    ray.data.DataContext.get_current().enable_progress_bars = False
    return inputs.generate(stage, config)


def _relabel(inputs: PseudoLabelInputs, stage: StageDir, config: PipelineConfig) -> dict[str, Any]:
    """Label ``inputs`` into ``stage`` with the trial config's generator; the stage's summary (scores included).

    Tasks started from a trial land in the trial's placement group, which holds no CPU: the stage runs in a task
    scheduled outside it, so its Ray Data actor pool and CRF tasks take the cluster's CPUs.
    """
    label = ray.remote(_generate_outside_trial).options(num_cpus=0, scheduling_strategy="DEFAULT")
    return ray.get(label.remote(inputs, stage, config))


def pseudo_labels_trial(params: dict[str, Any], *, base: dict[str, Any], inputs: PseudoLabelInputs,
                        sweep_uri: str) -> None:
    """One pseudo_labels trial: label the images with the trial's generator settings, report the scores once.

    Per-image outputs are resumable, so a restored trial only labels the images it had not finished.
    """
    config = trial_config(base, params, source=f"trial {tune.get_context().get_trial_id()}")
    stage = _trial_stage(sweep_uri, "pseudo_labels")
    summary = _relabel(inputs, stage, config)
    scores = summary["scores"]
    metrics: dict[str, Any] = {"epoch": 1, "images": summary["written"], "failed": summary["failed"]}
    if "pseudo" in scores:
        metrics.update(pseudo_miou=scores["pseudo"]["miou"], pseudo_precision=scores["pseudo"]["precision"],
                       pseudo_coverage=scores["pseudo"]["coverage"])
    if "cam" in scores:
        metrics["cam_miou"] = scores["cam"]["miou"]
    storage.write_json(stage.path("summary.json"), {"params": params, "finished_at": time.time(), **summary})
    tune.report(metrics)


def relabel_train_seg_trial(params: dict[str, Any], *, base: dict[str, Any], inputs: PseudoLabelInputs,
                            val_records: list[ManifestRecord], sweep_uri: str) -> None:
    """One relabel_train_seg trial: relabel the images with the trial's generator settings, then train on them.

    The masks (and the generator's other outputs, e.g. CDSP's distance maps) go to the trial's folder; the
    segmenter trains on them exactly as a train_seg trial trains on the shared ones, its epoch metrics reaching
    Tune through ``TuneReportCallback``. Both halves resume: a restored trial labels only the images it had not
    finished (none, once labelling is done) and continues training from its latest Ray Train checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    ray.data.DataContext.get_current().enable_progress_bars = False
    config = trial_config(base, params, source=f"trial {tune.get_context().get_trial_id()}")
    # One folder for both halves (their files do not overlap: pseudo/, stats/, generator.json against
    # ray_train/, model.pt, history.json); the stage name is the Ray Train run name, which resuming needs.
    stage = _trial_stage(sweep_uri, "train_seg")
    pseudo = _relabel(inputs, stage, config)
    # Kept apart from summary.json, which only a trial that trains to the end writes itself (ASHA ends the others).
    storage.write_json(stage.path(RELABEL_FILE), pseudo)
    training = inputs.segmentation_inputs(stage, config, val_records)
    if not training.records:
        raise RuntimeError(f"relabelling wrote no pseudo-mask for any of the {len(inputs.records)} images "
                           f"({pseudo['failed']} failed; see {pseudo.get('failures_uri')})")
    summary = training.train(stage, config, callbacks=[TuneReportCallback()], model_card=False)
    storage.write_json(stage.path("summary.json"), {"params": params, "finished_at": time.time(),
                                                    "pseudo_labels": pseudo, **summary})


# ------------------------------------------------------------------------------------------------- resources


def max_concurrent_trials(space: SearchSpace, config: PipelineConfig) -> int:
    """How many trials the cluster runs side by side (at least 1), from each trial's CPU/GPU needs.

    train_seg: the driver plus its train workers, with one CPU kept for Ray Data's ingest tasks; on GPUs, the
    workers' GPUs bound it too. pseudo_labels: the model actor pool plus one CPU for the CRF tasks.
    relabel_train_seg: the smaller of the two, since a trial needs each in turn and trials drift out of step.
    """
    counts = {"train_seg": _train_seg_trials, "pseudo_labels": _pseudo_labels_trials}
    kinds = ("train_seg", "pseudo_labels") if space.trial == "relabel_train_seg" else (space.trial,)
    count = max(1, min(counts[kind](config, cluster_cpus(), cluster_gpus()) for kind in kinds))
    return min(count, space.max_concurrent_trials) if space.max_concurrent_trials else count


def _train_seg_trials(config: PipelineConfig, cpus: float, gpus: float) -> int:
    workers = config.train_seg.workers
    plan = plan_workers("train_seg.workers", workers.num_workers, workers.use_gpu, gpus, cluster_autoscales(),
                        config.train_seg.batch_size, workers.min_workers)
    if plan.use_gpu:
        return int(min(gpus // plan.num_workers, (cpus - 1) // (TRAIN_DRIVER_CPUS + plan.num_workers
                                                                * workers.cpus_per_worker)))
    per_trial = TRAIN_DRIVER_CPUS + workers.num_workers * min(workers.cpus_per_worker, cpus)
    return int((cpus - 1) // per_trial)


def _pseudo_labels_trials(config: PipelineConfig, cpus: float, gpus: float) -> int:
    pool = config.pseudo_labels
    if plan_actor_pool("pseudo_labels", pool.max_actors, pool.use_gpu, gpus, cpus, cluster_autoscales()).use_gpu:
        return int(gpus // min(pool.max_actors, max(gpus, 1)))
    return int(cpus // (min(pool.max_actors, max(cpus - 1, 1)) + 1))


def _scheduler(space: SearchSpace, config: PipelineConfig) -> Any:
    # A pseudo_labels trial reports once, so there is nothing for ASHA to stop early.
    if space.scheduler == "fifo" or space.trial not in EPOCH_TRIALS:
        return FIFOScheduler()
    epochs = config.train_seg.epochs
    # "epoch" rather than training_iteration: a trial restored from its Ray Train checkpoint continues its epoch
    # count, while Tune's iteration counter would start again from 1.
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(space.grace_period, epochs),
                         reduction_factor=space.reduction_factor)


# ------------------------------------------------------------------------------------------------- the sweep


def run_sweep(space_path: str | Path, overrides: tuple[str, ...] | list[str] = (), resume: bool = True,
              verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep of a space YAML; returns what ``results.json`` holds.

    ``overrides`` (``key.path=value``) apply to the base pipeline config. ``resume=False`` deletes an earlier
    sweep of the same name first (its Tune state, trials, results and report) and starts over.
    """
    from wsss_ray.pipeline import run_stages
    from wsss_ray.report.console import print_stage_summary

    space, config = load_space(space_path, tuple(overrides))
    _check_dashboard(space_path, config)
    started = time.monotonic()
    wiring = run_stages(config, until="pseudo_labels", verbose=verbose)  # shared inputs; skipped once done
    print_stage_summary(wiring.summaries)
    sweep_uri = storage.join(config.output, "sweeps", space.name)
    base = config.model_dump(mode="json")
    fingerprint = {"space": space.model_dump(mode="json"), "base_config": base,
                   "hash": config_hash(space.model_dump(mode="json", exclude={"max_concurrent_trials"}), base)}
    _check_fingerprint(sweep_uri, fingerprint, resume)
    trainable = _trainable(space, wiring, base, sweep_uri)
    grid = _tuner(space, config, trainable, sweep_uri, resume).fit()
    return _finish_sweep(grid, space, config, sweep_uri, started)


def _check_dashboard(space_path: str | Path, config: PipelineConfig) -> None:
    """A sweep on a local cluster needs Ray's dashboard; one joining a running cluster uses that cluster's."""
    if not (cluster_address(config.ray) or config.ray.include_dashboard):
        # Measured: without the state API, Ray Train's PlacementGroupCleaner never learns that an early-stopped
        # trial's controller died, so each stopped trial keeps its workers' CPUs and the sweep stalls.
        raise ConfigError(f"{space_path}: base config ray.include_dashboard: a sweep on a local cluster needs "
                          "Ray's dashboard (its state API lets Ray Train free the CPUs of early-stopped trials); "
                          "set it to true")


def _trainable(space: SearchSpace, wiring: StageWiring, base: dict[str, Any], sweep_uri: str) -> Any:
    """The trial function of ``space.trial`` with its shared inputs bound (asked of the base run's wiring),
    holding ``TRIAL_RESOURCES``."""
    if space.trial == "train_seg":
        trainable = tune.with_parameters(train_seg_trial, base=base, inputs=wiring.segmentation_inputs(),
                                         sweep_uri=sweep_uri)
    elif space.trial == "relabel_train_seg":
        trainable = tune.with_parameters(
            relabel_train_seg_trial, base=base, inputs=wiring.pseudo_label_inputs(space.max_images),
            val_records=wiring.val_records(), sweep_uri=sweep_uri)
    else:
        trainable = tune.with_parameters(pseudo_labels_trial, base=base,
                                         inputs=wiring.pseudo_label_inputs(space.max_images), sweep_uri=sweep_uri)
    return tune.with_resources(trainable, TRIAL_RESOURCES)


def _tuner(space: SearchSpace, config: PipelineConfig, trainable: Any, sweep_uri: str, resume: bool) -> tune.Tuner:
    """``Tuner.restore`` of an earlier run of the sweep when there is one to resume, else a new ``Tuner``."""
    # The Tune experiment is <output>/sweeps/<name> itself, next to trials/, results.json and report/.
    storage_path, filesystem = storage.train_storage(storage.join(config.output, "sweeps"))
    experiment_path, _ = storage.train_storage(sweep_uri)
    concurrent = max_concurrent_trials(space, config)
    if resume and tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        log("sweep", f"resuming {space.name} from {sweep_uri}")
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=filesystem)
    log("sweep", f"{space.name}: {space.trial} trials, {space.scheduler}, ≤{concurrent} at once → {sweep_uri}")
    return tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=_scheduler(space, config),
                                    num_samples=space.num_samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=space.name, storage_path=storage_path, storage_filesystem=filesystem,
            # Listed explicitly so that event files are written even where auto loggers are switched off
            # (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS); Tune adds no second one when one is given.
            callbacks=[TBXLoggerCallback()],
            sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
            # A trial whose process's node is lost (spot preemption) restarts in place, and its Ray Train run
            # resumes from its checkpoint (same trial id, same run name); a trial that keeps failing ends as
            # ERROR, and running the sweep again resumes it (resume_errored).
            failure_config=tune.FailureConfig(max_failures=TRIAL_RESTARTS),
            verbose=1,
        ),
    )


def _finish_sweep(grid: Any, space: SearchSpace, config: PipelineConfig, sweep_uri: str,
                  started: float) -> dict[str, Any]:
    """Results of a finished ``Tuner.fit``: stopped trials' models exported, ``results.json``, the report."""
    results = collect_results(grid, space, config, sweep_uri)
    if space.trial in EPOCH_TRIALS:
        for trial in results["trials"]:
            if trial["status"] == "TERMINATED":
                finish_stopped_trial(trial)
    results["seconds"] = round(time.monotonic() - started, 1)
    storage.write_json(storage.join(sweep_uri, RESULTS_FILE), results)
    from wsss_ray.tuning.report import write_sweep_report

    results["report_uri"] = write_sweep_report(storage.join(sweep_uri, "report"), results, space)
    storage.write_json(storage.join(sweep_uri, RESULTS_FILE), results)
    print_results(results)
    return results


def finish_stopped_trial(trial: dict[str, Any]) -> str | None:
    """``model.pt``, ``history.json`` and ``summary.json`` of a trial the scheduler stopped (a results row).

    ASHA stops trials at its rungs and, with Ray's ``stop_last_trials``, also at ``max_t``: the trial function
    is ended right after that epoch's report, before ``train_segmentation`` could export its weights and the
    trial write its summary. The latest Ray Train checkpoint holds the weights (an epoch's checkpoint is saved
    before its metrics are reported). A trial that finished on its own is left as it is. Returns the model's
    URI, or None when there was no checkpoint to export.
    """
    from wsss_ray.training.checkpoint import MODEL_FILE, export_checkpoint

    summary_uri = storage.join(trial["uri"], "summary.json")
    if storage.exists(summary_uri):
        model_uri = storage.join(trial["uri"], MODEL_FILE)
        return model_uri if storage.exists(model_uri) else None
    # Ray Train names checkpoints checkpoint_<timestamp>: the greatest name is the latest epoch's.
    checkpoints = {uri.rsplit("/", 2)[-2]: uri.rsplit("/", 1)[0]
                   for uri in storage.list_files(storage.join(trial["uri"], "ray_train"), suffix=f"/{MODEL_FILE}")
                   if uri.rsplit("/", 2)[-2].startswith("checkpoint_")}
    if not checkpoints:
        return None
    path, filesystem = storage.train_storage(checkpoints[max(checkpoints)])
    exported = export_checkpoint(Checkpoint(path, filesystem), trial["uri"])
    relabel_uri = storage.join(trial["uri"], RELABEL_FILE)
    relabel = {"pseudo_labels": storage.read_json(relabel_uri)} if storage.exists(relabel_uri) else {}
    storage.write_json(summary_uri, {"params": trial["params"], "finished_at": time.time(),
                                     "stopped_early": trial["stopped_early"], **exported, **relabel})
    return exported["model_uri"]


def _check_fingerprint(sweep_uri: str, fingerprint: dict[str, Any], resume: bool) -> None:
    """Refuse to resume a sweep of the same name made from a different space or base config."""
    uri = storage.join(sweep_uri, FINGERPRINT_FILE)
    if not resume:
        if storage.exists(sweep_uri):
            log("sweep", f"--no-resume: deleting the earlier sweep at {sweep_uri}")
            storage.delete(sweep_uri)
    elif storage.exists(uri):
        previous = storage.read_json(uri)
        if previous.get("hash") != fingerprint["hash"]:
            raise RuntimeError(f"{sweep_uri} holds a sweep of a different space or base config "
                               f"(hash {previous.get('hash')} != {fingerprint['hash']}); rename the space or "
                               "run with --no-resume to replace it")
    storage.write_json(uri, fingerprint)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become None, numpy numbers plain Python ones."""
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    return value


def collect_results(grid: Any, space: SearchSpace, config: PipelineConfig, sweep_uri: str) -> dict[str, Any]:
    """One row per trial (id, params, best and last metric, epochs run, status, per-epoch history), the best."""
    better = max if space.mode == "max" else min
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        params = {k: _clean(v) for k, v in (result.config or {}).items()}
        history: list[dict[str, Any]] = []
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            columns = [c for c in dict.fromkeys(("epoch", space.metric, *TRIAL_METRICS[space.trial]))
                       if c in frame.columns]
            history = [{k: _clean(v) for k, v in row.items()} for row in frame[columns].to_dict("records")]
            # A restored trial appends to its log from the epoch it resumed at; keep the latest row per epoch.
            history = list({row.get("epoch"): row for row in history}.values())
        values = [row[space.metric] for row in history if row.get(space.metric) is not None]
        epochs = int(max([row.get("epoch") or 0 for row in history], default=0))
        status = "ERROR" if result.error else "TERMINATED"
        trials.append({
            "id": trial_id, "params": params, "metric": better(values) if values else None,
            "last_metric": values[-1] if values else None, "epochs": epochs, "status": status,
            "stopped_early": space.trial in EPOCH_TRIALS and status == "TERMINATED"
            and epochs < config.train_seg.epochs,
            "error": str(result.error).splitlines()[0] if result.error else None,
            "uri": storage.join(sweep_uri, "trials", trial_id), "history": history,
        })
    trials.sort(key=lambda t: t["id"])
    scored = [t for t in trials if t["metric"] is not None]
    best = better(scored, key=lambda t: t["metric"]) if scored else None
    return {
        "name": space.name, "trial": space.trial, "metric": space.metric, "mode": space.mode,
        "scheduler": space.scheduler if space.trial in EPOCH_TRIALS else "fifo",
        "max_epochs": config.train_seg.epochs if space.trial in EPOCH_TRIALS else 1,
        "trial_epochs": sum(t["epochs"] for t in trials),
        "trials": trials,
        "best": None if best is None else {"id": best["id"], "metric": best["metric"], "params": best["params"],
                                           "overrides": param_overrides(best["params"])},
        "experiment_uri": sweep_uri,
    }


def print_results(results: dict[str, Any]) -> None:
    metric = results["metric"]
    print(f"\nsweep {results['name']}: {len(results['trials'])} trials, {results['trial_epochs']} trial-epochs")
    for trial in results["trials"]:
        value = "–" if trial["metric"] is None else f"{trial['metric']:.4f}"
        print(f"  {trial['id']}  {trial['status']:<10} epochs {trial['epochs']:>3}  {metric} {value}  "
              + " ".join(f"{k}={v}" for k, v in trial["params"].items()))
    best = results["best"]
    if best:
        print(f"best {metric} {best['metric']:.4f}: " + " ".join(f"--set {o}" for o in best["overrides"]))
    print(f"results: {storage.join(results['experiment_uri'], RESULTS_FILE)}")
    print(f"report:  {results.get('report_uri')}")
    print(f"tensorboard --logdir {results['experiment_uri']}")
