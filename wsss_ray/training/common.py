"""What the classifier and segmentation trainers share: optimiser and schedule, checkpoints, the Ray Train run.

Inside a worker, a training loop reads like torchvision's reference ``train.py``; the Ray-specific parts are
``restore`` (resume from the run's latest checkpoint, also after a worker was killed and the group restarted),
``report_epoch`` (metrics + checkpoint, a barrier across workers) and ``fit`` (the TorchTrainer around it).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from wsss_ray import storage
from wsss_ray.config import OptimizerConfig, WorkersConfig
from wsss_ray.data.transforms import normalize
from wsss_ray.ray_utils import cluster_cpus, want_gpu
from wsss_ray.stage_dir import StageDir

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.pt", "optimizer.pt", "state.json"
# The objective's own parameters (LoRM) and OuT's EMA teacher, saved beside the model when present.
OBJECTIVE_FILE, TEACHER_FILE = "objective.pt", "teacher.pt"


def build_optimizer(groups: tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]], config: OptimizerConfig,
                    head_lr_multiplier: float) -> torch.optim.SGD:
    """SGD over (backbone, head) parameter groups; heads get ``head_lr_multiplier`` × lr (DeepLab, IRN)."""
    backbone, head = groups
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": config.lr}, {"params": head, "lr": config.lr * head_lr_multiplier}],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, power: float) -> float:
    """lr = initial_lr · (1 − step/total)^power, the schedule of DeepLab and all five papers' segmenters."""
    factor = (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def set_warmup_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to initial_lr over ``warmup_steps``, then cosine decay to 0 (CDSP)."""
    if step < warmup_steps:
        factor = (step + 1) / warmup_steps
    else:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def set_lr(optimizer: torch.optim.Optimizer, config: OptimizerConfig, step: int, total_steps: int,
           steps_per_epoch: int) -> float:
    if config.schedule == "warmup_cosine":
        return set_warmup_cosine_lr(optimizer, step, total_steps, config.warmup_epochs * steps_per_epoch)
    return set_poly_lr(optimizer, step, total_steps, config.poly_power)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def restore(step: torch.nn.Module, optimizer: torch.optim.Optimizer,
            extras: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Load the run's latest checkpoint if there is one; returns (first epoch to run, history so far).

    ``step`` is the :class:`~wsss_ray.training.objectives.TrainStep` (model + objective); ``extras`` maps file
    names to objects with ``load_state_dict`` saved beside it (OuT's EMA teacher).
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        def load(name: str) -> Any:
            return torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)

        step.model.load_state_dict(load(MODEL_FILE))
        if os.path.exists(os.path.join(directory, OBJECTIVE_FILE)):
            step.objective.load_state_dict(load(OBJECTIVE_FILE))
        optimizer.load_state_dict(load(OPTIMIZER_FILE))
        for name, target in extras.items():
            if os.path.exists(os.path.join(directory, name)):
                target.load_state_dict(load(name))
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
    if ray.train.get_context().get_world_rank() == 0:
        print(f"resuming from epoch {state['epoch'] + 1} ({checkpoint.path})", flush=True)
    return state["epoch"] + 1, state["history"]


def mean_across_workers(value: float, device: torch.device) -> float:
    if dist.is_available() and dist.is_initialized():
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / dist.get_world_size()
    return value


class TensorBoardLog:
    """Per-epoch scalars as TensorBoard event files in ``<stage>/tensorboard`` (rank 0 only).

    tensorboardX writes to a local folder; for object storage the folder is uploaded after each epoch, so
    ``tensorboard --logdir <stage>/tensorboard`` (or an s3:// logdir) shows the curves while training runs.
    """

    def __init__(self, uri: str) -> None:
        from tensorboardX import SummaryWriter

        self.uri = uri
        local = storage.local_path_or_none(uri)
        self.local_dir = local or tempfile.mkdtemp(prefix="wsss-tb-")
        self.writer = SummaryWriter(self.local_dir)

    def write(self, epoch: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        if storage.local_path_or_none(self.uri) is None:
            storage.upload_dir(self.local_dir, self.uri)


def report_epoch(step: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                 history: list[dict[str, Any]], metrics: dict[str, Any], extras: dict[str, Any],
                 tensorboard: TensorBoardLog | None) -> None:
    """Append the epoch's metrics, checkpoint (rank 0 writes; every rank reports, as Ray Train requires)."""
    history.append({"epoch": epoch + 1, **metrics})
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            step = unwrap(step)
            torch.save(step.model.state_dict(), os.path.join(directory, MODEL_FILE))
            if step.objective.state_dict():
                torch.save(step.objective.state_dict(), os.path.join(directory, OBJECTIVE_FILE))
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
            for name, source in extras.items():
                torch.save(source.state_dict(), os.path.join(directory, name))
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump({"epoch": epoch, "history": history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(f"epoch {epoch + 1}: {line}", flush=True)
            if tensorboard is not None:
                tensorboard.write(epoch + 1, metrics)
        ray.train.report({"epoch": epoch + 1, **metrics}, checkpoint=checkpoint)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (AMP); a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class EpochTimer:
    def __init__(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def throughput(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


# Blocks of the training rows: enough map tasks in flight for any cluster, and independent of its size.
TRAIN_BLOCKS = 200


def epoch_seeded_dataset(records: list[dict[str, Any]], seed: int, sample: Any,
                         fn_kwargs: dict[str, Any]) -> ray.data.Dataset:
    """Training rows in a new order every epoch, each mapped by ``sample`` with its own augmentation seed.

    Ray Data executes a dataset afresh for every epoch, and ``reseed_after_execution`` mixes that execution's
    index into the shuffle's seed and into each row's ``augment_seed`` (read by :func:`augment_rng`). So every
    epoch sees a new order and new crops, as with torchvision's ``RandomSampler``, and two runs with the same
    ``seed`` see the same ones: a sweep's trials and a rerun of one config differ only by their hyperparameters.
    That needs the rows to reach the workers in order, which ``fit`` asks of the ingest (``preserve_order``).
    A run resumed from a checkpoint (or after a worker failure) starts again from epoch 0's draws, because the
    restarted split coordinator counts executions from 0.
    """
    from ray.data.expressions import random as random_column

    reseeded = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    # The shuffle and the per-row seeds depend on the block layout; Ray's automatic block count follows the
    # cluster's CPUs (and a trial's placement group), so fix it to repeat on any cluster.
    return (ray.data.from_items(records, override_num_blocks=max(1, min(len(records), TRAIN_BLOCKS)))
            .random_shuffle(seed=reseeded)
            .with_column("augment_seed", random_column(seed=seed, reseed_after_execution=True))
            .map(sample, fn_kwargs=fn_kwargs))


def augment_rng(row: dict[str, Any]) -> np.random.Generator:
    """The generator for one row's augmentation, seeded by the ``augment_seed`` column (a float in [0, 1) with
    53 random bits) that :func:`epoch_seeded_dataset` adds."""
    return np.random.default_rng(int(row["augment_seed"] * 2**53))


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int) -> tuple[int, int]:
    """(per-worker batch size, steps per epoch) with ``drop_last``; the batch shrinks for tiny datasets."""
    per_worker = max(1, num_rows // num_workers)
    batch = min(batch_size, per_worker)
    return batch, max(1, per_worker // batch)


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    """Numeric batch columns as tensors on ``device`` (the image normalised); strings and geometry stay numpy."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "image":
            out[key] = normalize(torch.from_numpy(value).to(device))
        elif key == "geometry" or value.dtype.kind in "OUS":
            out[key] = value
        else:
            out[key] = torch.from_numpy(value).to(device)
    return out


def _maybe_sync_bn(model: torch.nn.Module, wanted: bool, device: torch.device) -> torch.nn.Module:
    """SyncBatchNorm when asked for and it can work: several workers on CUDA (torch's SyncBN is GPU-only)."""
    if not wanted or ray.train.get_context().get_world_size() == 1:
        return model
    if device.type != "cuda":
        if ray.train.get_context().get_world_rank() == 0:
            print("sync_bn: SyncBatchNorm needs CUDA; training on CPU keeps per-worker BatchNorm", flush=True)
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def train_loop(loop: dict[str, Any]) -> None:
    """Runs in every Ray Train worker; reads top to bottom like torchvision's reference ``train_one_epoch``.

    ``loop`` carries the stage config and what differs between stages and methods: ``build_model``,
    ``build_objective`` (a component from ``objectives``), and for segmentation the optional OuT ``corrector`` and
    ``early_learning`` configs. Steps per epoch follow the live worker count, so an elastic group that grew or
    shrank keeps covering the data once per epoch.
    """
    from wsss_ray.training.objectives import TrainStep

    config = loop["config"]
    # DeepLab's image-pooling branch runs a 1x1 conv on a 1x1 map, whose gradient strides DDP reports as a
    # layout mismatch on every step; it is harmless (a copy into the bucket), so keep the log readable.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.set_num_threads(loop["threads"])
    torch.manual_seed(config.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = _maybe_sync_bn(loop["build_model"](), getattr(getattr(config, "model", None), "sync_bn", False), device)
    step = TrainStep(model, loop["build_objective"]()).to(device)
    optimizer = build_optimizer(step.parameter_groups(), config.optimizer, config.head_lr_multiplier)
    corrector, early_learning = None, None
    if loop.get("corrector") is not None:
        from wsss_ray.training.online_correction import OnlineCorrector

        corrector = OnlineCorrector(loop["corrector"], model, loop["stage_uri"])
    if loop.get("early_learning") is not None:
        from wsss_ray.training.noise_robust import EarlyLearning

        early_learning = EarlyLearning(loop["early_learning"].key_fraction)
    extras = {TEACHER_FILE: corrector.teacher} if corrector else {}
    start_epoch, history = restore(step, optimizer, extras)
    if corrector and start_epoch == 0 and rank == 0:
        corrector.reset_store()
    ddp_step = ray.train.torch.prepare_model(step)
    tensorboard = TensorBoardLog(storage.join(loop["stage_uri"], "tensorboard")) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    batch_size, steps = steps_per_epoch(loop["num_rows"], config.batch_size, world)
    total_steps = steps * config.epochs
    for epoch in range(start_epoch, config.epochs):
        ddp_step.train()
        timer, sums, count, lr = EpochTimer(), dict[str, float](), 0, 0.0
        for i, raw in enumerate(shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy")):
            if i >= steps:  # an uneven split must not give one worker an extra (unsynchronised) step
                break
            lr = set_lr(optimizer, config.optimizer, epoch * steps + i, total_steps, steps)
            batch = to_device(raw, device)
            terms: dict[str, Any] = corrector.correct(batch, epoch) if corrector else {}
            with autocast(device):
                loss, loss_terms = ddp_step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if early_learning is not None:
                terms["key_fraction"] = early_learning.apply(step.parameters())
            optimizer.step()
            if corrector:
                corrector.update(step.model)
            logged = {"loss": loss.detach(), **{f"loss_{k}": v for k, v in loss_terms.items()}, **terms}
            for key, value in logged.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
            timer.images += len(batch["image"])
        metrics = {key: mean_across_workers(total / max(count, 1), device) for key, total in sums.items()}
        metrics.update(lr=lr, images_per_s=mean_across_workers(timer.throughput(), device) * world)
        every = loop.get("val_every", 0)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == config.epochs):
            metrics["val_miou"] = validate(step.model, loop["num_classes"], device)
        report_epoch(ddp_step, optimizer, epoch, history, metrics, extras, tensorboard)


@torch.no_grad()
def validate(model: torch.nn.Module, num_classes: int, device: torch.device) -> float:
    """Val mIoU of a segmentation model from one confusion matrix summed over all workers.

    Every worker reads the (unsplit) ``val`` dataset and predicts its own share of images (row i on rank
    i mod world size), so each image counts exactly once whatever the worker count, then the matrices are
    all-reduced: the dataset-level mIoU, not a mean of per-worker scores.
    """
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    # batch_size 1: val images keep their own sizes (no crop), as in the papers' evaluation.
    for i, batch in enumerate(ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=1)):
        if i % world != rank:
            continue
        image, target = normalize(batch["image"].to(device)), batch["label"].to(device).long()
        with autocast(device):
            pred = model(image).argmax(1)
        valid = target != 255
        confusion += torch.bincount(target[valid] * num_classes + pred[valid], minlength=num_classes**2)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    mat = confusion.view(num_classes, num_classes).double()
    union = mat.sum(0) + mat.sum(1) - mat.diag()
    iou = mat.diag() / union
    return float(iou[union > 0].mean()) if (union > 0).any() else float("nan")


def fit(loop: dict[str, Any], workers: WorkersConfig, datasets: dict[str, ray.data.Dataset],
        stage: StageDir, callbacks: list[Any] | None = None) -> ray.train.Result:
    """Run ``train_loop`` with DDP on Ray Train, checkpointing to the stage's storage.

    Re-running with the same stage directory resumes from the latest checkpoint: Ray Train V2 restores the run
    state from ``storage_path/name`` and ``ray.train.get_checkpoint()`` returns it inside the loop.
    """
    use_gpu = want_gpu(workers.use_gpu)
    storage_path, filesystem = storage.train_storage(stage.path("ray_train"))
    cpus = workers.cpus_per_worker if use_gpu else min(workers.cpus_per_worker, cluster_cpus() / workers.num_workers)
    loop = {**loop, "threads": max(1, math.floor(cpus)), "stage_uri": stage.uri}
    # (min, max) makes the group elastic (Ray Train V2): it starts with what fits and resizes as nodes come and go.
    num_workers = workers.num_workers if workers.min_workers is None else (workers.min_workers, workers.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=stage.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=workers.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Only the training data is split across workers; ``validate`` shares out the val rows itself.
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": _ordered_ingest()}),
    )
    return trainer.fit()


def _ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options with ``preserve_order``: the training rows reach the workers in the seeded
    order of ``epoch_seeded_dataset`` (else in whichever order the map tasks finish), so runs repeat."""
    # A copy of the driver's options, as DataConfig.default_ingest_options would give (without its deprecated
    # exclude_resources argument, which warns in every trial).
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def export_model(result: ray.train.Result, stage: StageDir) -> dict[str, Any]:
    """Copy the final weights out of the run's last checkpoint to ``<stage>/model.pt``.

    Returns the stage summary part: the model's URI, its SHA-256 (downstream stages key their outputs by it,
    so retrained weights never reuse stale pseudo-labels) and the per-epoch history.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"{stage.name}: training finished without a checkpoint ({stage.uri})")
    return export_checkpoint(result.checkpoint, stage.uri)


def export_checkpoint(checkpoint: ray.train.Checkpoint, stage_uri: str) -> dict[str, Any]:
    """``export_model`` for a given checkpoint: its weights to ``<stage_uri>/model.pt``, its history beside them."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, MODEL_FILE), "rb") as f:
            weights = f.read()
        with open(os.path.join(directory, STATE_FILE)) as f:
            history = json.load(f)["history"]
    model_uri = storage.join(stage_uri, MODEL_FILE)
    storage.write_bytes(model_uri, weights)
    storage.write_json(storage.join(stage_uri, "history.json"), history)
    return {"model_uri": model_uri, "model_sha256": hashlib.sha256(weights).hexdigest(), "history": history}


def load_weights(model: torch.nn.Module, uri: str) -> torch.nn.Module:
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True))
    return model

