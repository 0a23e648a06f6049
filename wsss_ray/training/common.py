"""What the classifier and segmentation trainers share: optimiser and schedule, checkpoints, the Ray Train run.

Inside a worker, a training loop reads like torchvision's reference ``train.py``; the Ray-specific parts are
``restore`` (resume from the run's latest checkpoint, also after a worker was killed and the group restarted),
``report_epoch`` (metrics + checkpoint, a barrier across workers) and ``fit`` (the TorchTrainer around it).
"""

from __future__ import annotations

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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    """Load the run's latest checkpoint if there is one; returns (first epoch to run, history so far)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        model.load_state_dict(torch.load(os.path.join(directory, MODEL_FILE), weights_only=True))
        optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
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


def report_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                 history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Append the epoch's metrics, checkpoint (rank 0 writes; every rank reports, as Ray Train requires)."""
    history.append({"epoch": epoch + 1, **metrics})
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(unwrap(model).state_dict(), os.path.join(directory, MODEL_FILE))
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump({"epoch": epoch, "history": history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(f"epoch {epoch + 1}: {line}", flush=True)
        ray.train.report({"epoch": epoch + 1, **metrics}, checkpoint=checkpoint)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (AMP); a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class EpochTimer:
    def __init__(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def throughput(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int) -> tuple[int, int]:
    """(per-worker batch size, steps per epoch) with ``drop_last``; the batch shrinks for tiny datasets."""
    per_worker = max(1, num_rows // num_workers)
    batch = min(batch_size, per_worker)
    return batch, max(1, per_worker // batch)


def train_loop(loop: dict[str, Any]) -> None:
    """Runs in every Ray Train worker; reads top to bottom like torchvision's reference ``train_one_epoch``.

    ``loop`` carries the stage config and the pieces that differ between stages: ``build_model`` (returns the
    module), ``loss`` (a component from ``losses``) and ``target`` (the batch column the loss compares with).
    """
    config = loop["config"]
    # DeepLab's image-pooling branch runs a 1x1 conv on a 1x1 map, whose gradient strides DDP reports as a
    # layout mismatch on every step; it is harmless (a copy into the bucket), so keep the log readable.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.set_num_threads(loop["threads"])
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()
    model = loop["build_model"]()
    optimizer = build_optimizer(model.parameter_groups(), config.optimizer, config.head_lr_multiplier)
    start_epoch, history = restore(model, optimizer)
    model = ray.train.torch.prepare_model(model)
    loss_fn = loop["loss"]
    shard = ray.train.get_dataset_shard("train")
    batch_size, steps = loop["batch_size"], loop["steps_per_epoch"]
    total_steps = steps * config.epochs
    for epoch in range(start_epoch, config.epochs):
        model.train()
        timer, losses, lr = EpochTimer(), [], 0.0
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, drop_last=True)):
            lr = set_poly_lr(optimizer, epoch * steps + i, total_steps, config.optimizer.poly_power)
            images, target = normalize(batch["image"].to(device)), batch[loop["target"]].to(device)
            with autocast(device):
                logits = model(images)
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            timer.images += len(images)
        metrics = {"loss": mean_across_workers(float(np.mean(losses)) if losses else float("nan"), device),
                   "lr": lr, "images_per_s": mean_across_workers(timer.throughput(), device) * loop["workers"]}
        every = loop.get("val_every", 0)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == config.epochs):
            metrics["val_miou"] = validate(model, loop["num_classes"], device)
        report_epoch(model, optimizer, epoch, history, metrics)


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
    loop = {**loop, "threads": max(1, math.floor(cpus)), "workers": workers.num_workers}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=use_gpu,
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
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


def export_model(result: ray.train.Result, stage: StageDir) -> dict[str, Any]:
    """Copy the final weights out of the run's last checkpoint to ``<stage>/model.pt``.

    Returns the stage summary part: the model's URI, its SHA-256 (downstream stages key their outputs by it,
    so retrained weights never reuse stale pseudo-labels) and the per-epoch history.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"{stage.name}: training finished without a checkpoint ({stage.uri})")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, MODEL_FILE), "rb") as f:
            weights = f.read()
        with open(os.path.join(directory, STATE_FILE)) as f:
            history = json.load(f)["history"]
    model_uri = stage.path(MODEL_FILE)
    storage.write_bytes(model_uri, weights)
    storage.write_json(stage.path("history.json"), history)
    return {"model_uri": model_uri, "model_sha256": hashlib.sha256(weights).hexdigest(), "history": history}


def load_weights(model: torch.nn.Module, uri: str) -> torch.nn.Module:
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True))
    return model

