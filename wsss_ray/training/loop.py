"""The Ray Train run shared by the classifier and segmentation trainers.

Inside a worker, the loop reads like torchvision's reference ``train.py``: ``train_loop`` sets up, then per epoch
``step.set_epoch`` (objectives with a schedule, like ``DistributedSampler.set_epoch``), ``train_one_epoch``,
``validate`` and ``report_epoch`` (metrics + checkpoint, a barrier across workers). What differs between stages
and methods comes in a typed :class:`TrainSpec`: how to build the model, its objective and the method's
:class:`~wsss_ray.training.hooks.TrainHook` s. ``fit`` is the TorchTrainer around it; the Ray-specific parts are
``restore`` (resume from the run's latest checkpoint, also after a worker was killed and the group restarted) and
the ordered ingest.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from wsss_ray.core import storage
from wsss_ray.core.config_base import OptimizerConfig, SpeedConfig, WorkersConfig
from wsss_ray.core.progress import log
from wsss_ray.core.ray_utils import cluster_autoscales, cluster_cpus
from wsss_ray.core.resources import WorkerPlan, plan_workers
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.core.torch_helpers import autocast
from wsss_ray.maths.inference import normalize
from wsss_ray.maths.metrics import TorchConfusionMatrix
from wsss_ray.training.checkpoint import latest_state, report_epoch, restore
from wsss_ray.training.console import EpochLines
from wsss_ray.training.hooks import TrainHook
from wsss_ray.training.ingest import RowSource, shard_stream, steps_per_epoch, to_device, val_stream
from wsss_ray.training.optim import build_optimizer, set_lr
from wsss_ray.training.speed import compile_step, optimizer_options, prepare_step
from wsss_ray.training.step import TrainStep
from wsss_ray.training.tensorboard import TensorBoardLog

# Ingest actors per training worker at most (a DataLoader's usual worker count; more rarely pays on one GPU).
MAX_INGEST_ACTORS = 8
MIN_INGEST_CPUS = 0.25  # the smallest ingest actor; below it a worker decodes its own rows


def no_hooks(model: nn.Module, stage_uri: str) -> list[TrainHook]:
    return []


@dataclass(frozen=True)
class TrainSpec:
    """What one training run needs inside its workers (sent to each as ``train_loop_config["spec"]``).

    The builders run in every worker after ``torch.manual_seed(seed)``, in this order: ``build_model()``,
    ``build_objective()`` (a component from the method registry), ``build_hooks(model, stage_uri)`` (OuT's
    corrector, robust early-learning). ``batch_size`` is the global batch (split over the workers; ``where``
    names its config section in errors). ``num_classes`` and ``val_every`` > 0 turn on val mIoU (segmentation,
    with ``val`` rows); ``threads`` and ``stage_uri`` are filled in by :func:`fit`.
    """

    epochs: int
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    head_lr_multiplier: float
    build_model: Callable[[], nn.Module]
    build_objective: Callable[[], nn.Module]
    train: RowSource
    where: str = "train"
    val: RowSource | None = None
    build_hooks: Callable[[nn.Module, str], list[TrainHook]] = no_hooks
    sync_bn: bool | Literal["auto"] = "auto"
    speed: SpeedConfig = dataclasses.field(default_factory=SpeedConfig)
    num_classes: int = 0
    val_every: int = 0
    threads: int = 1
    stage_uri: str = ""

    def validates(self, epoch: int) -> bool:
        """Whether val mIoU is measured after ``epoch`` (0-based): every ``val_every`` epochs and after the last."""
        every = self.val_every
        return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == self.epochs)


@dataclass
class WorkerRun:
    """One worker's live training objects, built by ``train_loop``."""

    spec: TrainSpec
    step: TrainStep  # unwrapped: what hooks and checkpoints see
    ddp_step: nn.Module  # DDP around ``step``: what checkpoints save
    forward: nn.Module  # what each step calls: ``ddp_step``, compiled when ``spec.speed.compile`` on CUDA
    optimizer: torch.optim.Optimizer
    hooks: list[TrainHook]
    shard: Iterator[dict[str, Any]]  # this worker's batches of ``train``, epoch after epoch
    device: torch.device
    world: int
    batch_size: int  # per worker
    steps: int


def means_across_workers(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Each value averaged over the workers, in one all-reduce of one vector (every worker must pass the same
    keys, as every worker runs the same steps and hooks); one process returns them as they are."""
    keys = sorted(values)  # the vector's layout: the same on every worker
    vector = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vector)
        vector /= dist.get_world_size()
    means = dict(zip(keys, vector.tolist(), strict=True))
    return {key: means[key] for key in values}  # in the caller's order (loss first in the epoch line and logs)


class EpochTimer:
    def __init__(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def throughput(self) -> float:
        return self.images / self.seconds()


def uses_sync_bn(wanted: bool | Literal["auto"], world: int, device_type: str) -> bool:
    """Whether BatchNorm becomes SyncBatchNorm: asked for (``True`` or ``"auto"``) and able to work, i.e. several
    workers on CUDA (torch's SyncBatchNorm is GPU-only; gloo on CPU has none)."""
    return bool(wanted) and world > 1 and device_type == "cuda"


def _maybe_sync_bn(model: nn.Module, wanted: bool | Literal["auto"], device: torch.device) -> nn.Module:
    context = ray.train.get_context()
    if uses_sync_bn(wanted, context.get_world_size(), device.type):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if wanted is True and context.get_world_size() > 1 and context.get_world_rank() == 0:
        print("sync_bn: SyncBatchNorm needs CUDA; training on CPU keeps per-worker BatchNorm", flush=True)
    return model


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: build, restore, then train / validate / checkpoint each epoch (a run
    restored after its last epoch only reports that epoch again).

    The global batch is split over the live worker count (checked again here: an elastic group may have
    resized to a count that does not divide it), so an elastic group that grew or shrank trains on the same
    batches, each epoch covering the data once.
    """
    spec: TrainSpec = loop_config["spec"]
    # DeepLab's image-pooling branch runs a 1x1 conv on a 1x1 map, whose gradient strides DDP reports as a
    # layout mismatch on every step; it is harmless (a copy into the bucket), so keep the log readable.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    saved = latest_state()
    start_epoch = 0 if saved is None else int(saved["epoch"]) + 1
    if saved is not None and start_epoch >= spec.epochs:
        # Restored after its last epoch: the process that trained it was killed between that checkpoint and the
        # end (a Tune trial whose sweep driver died). Nothing to train; report the last epoch again, without a
        # checkpoint, so this run's callbacks (the trial's TuneReportCallback) get the final metrics, which may
        # never have reached them.
        ray.train.report(saved["history"][-1])
        return
    # The ingest first: its actors start while the model is built and restored.
    batch_size, steps = steps_per_epoch(len(spec.train.records), spec.batch_size, world, spec.where)
    stream = shard_stream(spec.train, spec.seed, range(start_epoch, spec.epochs), steps, spec.batch_size, rank, world)
    model = _maybe_sync_bn(spec.build_model(), spec.sync_bn, device)
    step = prepare_step(TrainStep(model, spec.build_objective()), spec.speed, device)
    optimizer = build_optimizer(step.parameter_groups(), spec.optimizer, spec.head_lr_multiplier,
                                **optimizer_options(spec.speed, device))
    hooks = spec.build_hooks(model, spec.stage_uri)
    extras = {name: state for hook in hooks for name, state in hook.checkpoint_state().items()}
    restored_epoch, history = restore(step, optimizer, extras)
    assert restored_epoch == start_epoch, (restored_epoch, start_epoch)
    for hook in hooks:
        hook.on_start(start_epoch, rank)
    if rank == 0:
        print(f"{spec.where}: batch {spec.batch_size} global = {world} workers × {batch_size}", flush=True)
    ddp_step = ray.train.torch.prepare_model(step)
    run = WorkerRun(spec, step, ddp_step, compile_step(ddp_step, spec.speed, device), optimizer, hooks, stream,
                    device, world, batch_size, steps)
    tensorboard = TensorBoardLog(storage.join(spec.stage_uri, "tensorboard")) if rank == 0 else None
    for epoch in range(start_epoch, spec.epochs):
        step.set_epoch(epoch)  # also after a restore: the objective's schedule follows the loop's epoch
        metrics = train_one_epoch(run, epoch)
        if spec.validates(epoch):
            metrics["val_miou"] = validate(step.model, spec, device)
        report_epoch(run.ddp_step, optimizer, epoch, history, metrics, extras, tensorboard)


def train_one_epoch(run: WorkerRun, epoch: int) -> dict[str, Any]:
    """One pass over this worker's shard; returns the epoch's metrics, averaged over the workers.

    Each step: the lr for the global step, the hooks' ``before_step`` (may edit the batch), forward, backward,
    ``after_backward`` (may edit the gradients), ``optimizer.step()``, ``after_step``.
    """
    run.ddp_step.train()
    total_steps = run.steps * run.spec.epochs
    timer, sums, count, lr = EpochTimer(), dict[str, float | torch.Tensor](), 0, 0.0
    waited = 0.0  # seconds blocked on the input (torchvision's references log it as "data" time)
    for i in range(run.steps):  # every worker runs exactly ``steps`` steps (the stream holds exactly those rows)
        before = time.perf_counter()
        raw = next(run.shard)
        waited += time.perf_counter() - before
        lr = set_lr(run.optimizer, run.spec.optimizer, epoch * run.steps + i, total_steps, run.steps)
        batch = to_device(raw, run.device)
        terms: dict[str, Any] = {}
        for hook in run.hooks:
            terms.update(hook.before_step(batch, epoch))
        with autocast(run.device):
            loss, loss_terms = run.forward(batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for hook in run.hooks:
            terms.update(hook.after_backward(run.step))
        run.optimizer.step()
        for hook in run.hooks:
            hook.after_step(run.step.model)
        logged = {"loss": loss, **{f"loss_{k}": v for k, v in loss_terms.items()}, **terms}
        for key, value in logged.items():
            # Summed where they are (a tensor on the GPU stays there): no host sync per step and term.
            sums[key] = sums.get(key, 0.0) + (value.detach().double() if isinstance(value, torch.Tensor) else value)
        count += 1
        timer.images += len(batch["image"])
    metrics = means_across_workers({**{key: total / max(count, 1) for key, total in sums.items()},
                                    "images_per_s": timer.throughput(), "data_wait": waited / timer.seconds()},
                                   run.device)
    metrics["images_per_s"] *= run.world  # the workers' mean rate × their number: the group's rate
    metrics.update(lr=lr, world_size=run.world)  # an elastic group's size per epoch (it changes as nodes go and come)
    return metrics


@torch.no_grad()
def validate(model: nn.Module, spec: TrainSpec, device: torch.device) -> float:
    """Val mIoU of a segmentation model from one confusion matrix summed over all workers.

    Every worker reads and predicts only its own share of the val rows (row i on rank i mod world size), so
    each image counts exactly once whatever the worker count, then the matrices are all-reduced: the
    dataset-level mIoU, not a mean of per-worker scores.
    """
    assert spec.val is not None
    context = ray.train.get_context()
    model.eval()
    confusion = TorchConfusionMatrix(spec.num_classes, device)
    # One image at a time: val images keep their own sizes (no crop), as in the papers' evaluation.
    for row in val_stream(spec.val, context.get_world_rank(), context.get_world_size()):
        image = normalize(torch.from_numpy(np.asarray(row["image"]))[None].to(device))
        target = torch.from_numpy(np.asarray(row["label"]))[None].to(device).long()
        with autocast(device):
            pred = model(image).argmax(1)
        confusion.update(target, pred)
    return confusion.all_reduce().miou()


def ingest_actors(cluster_cpus: float, cpus_per_worker: float, workers: int) -> tuple[float, int]:
    """(CPUs per ingest actor, actors per training worker) that fit beside ``workers`` trainers.

    Every worker's actors must fit in what the trainers leave (a 2-CPU machine with two 0.5-CPU workers leaves one
    0.5-CPU actor per worker); at most one CPU each, as Ray's default for a task. Less than ``MIN_INGEST_CPUS``
    free per worker: no actor could ever be placed (the stream would wait for ever), so none (0): each worker
    decodes its rows itself.
    """
    free = max(0.0, cluster_cpus - cpus_per_worker * workers) / workers
    task_cpus = min(1.0, max(MIN_INGEST_CPUS, free))
    if free < MIN_INGEST_CPUS:
        return task_cpus, 0
    return task_cpus, max(1, min(MAX_INGEST_ACTORS, math.floor(free / task_cpus)))


def fit(spec: TrainSpec, workers: WorkersConfig, stage: StageDir,
        callbacks: list[Any] | None = None) -> ray.train.Result:
    """Run ``train_loop`` with DDP on Ray Train, checkpointing to the stage's storage.

    Without ``callbacks`` the driver prints one line per epoch (:mod:`wsss_ray.training.console`); callers that
    pass their own (a Tune trial's report callback) print nothing of their own.

    Re-running with the same stage directory resumes from the latest checkpoint: Ray Train V2 restores the run
    state from ``storage_path/name`` and ``ray.train.get_checkpoint()`` returns it inside the loop.
    """
    plan = plan_workers(f"{spec.where}.workers", workers.num_workers, workers.use_gpu,
                        ray.cluster_resources().get("GPU", 0), cluster_autoscales(), spec.batch_size,
                        workers.min_workers)
    if plan.use_gpu or plan.num_workers != workers.num_workers:  # a CPU group as configured goes unsaid
        log(spec.where, plan.reason)
    count = plan.num_workers
    cpus = workers.cpus_per_worker if plan.use_gpu else min(workers.cpus_per_worker, cluster_cpus() / count)
    task_cpus, actors = ingest_actors(cluster_cpus(), cpus, count)
    spec = dataclasses.replace(spec, threads=max(1, math.floor(cpus)), stage_uri=stage.uri,
                               train=dataclasses.replace(spec.train, task_cpus=task_cpus, actors=actors))
    if callbacks is None:
        with EpochLines(stage.name, spec.epochs) as lines:
            return _trainer(spec, workers, plan, stage, [lines.callback], cpus).fit()
    return _trainer(spec, workers, plan, stage, callbacks, cpus).fit()


def _trainer(spec: TrainSpec, workers: WorkersConfig, plan: WorkerPlan, stage: StageDir, callbacks: list[Any],
             cpus: float) -> TorchTrainer:
    storage_path, filesystem = storage.train_storage(stage.path("ray_train"))
    # (min, max) makes the group elastic (Ray Train V2): it starts with what fits and resizes as nodes come and go.
    num_workers = plan.num_workers if plan.min_workers is None else (plan.min_workers, plan.num_workers)
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if plan.use_gpu else {})}),
        run_config=RunConfig(
            name=stage.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=workers.max_failures),
            callbacks=callbacks,
        ),
    )
