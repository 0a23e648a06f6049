"""Training ingest speed: the project's Ray Data ingest against a torch DataLoader, and a train_seg epoch on
Ray Train against a plain torch DDP loop. Every comparison runs side by side in this process, the variants
interleaved (A/B/A/B), and prints medians and the ratio of medians.

Run it inside a loopback-only network namespace (it starts a 2-CPU local Ray cluster):

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/train_ingest.py'

(a) Ingest: rows/s delivered to one consumer (this driver) over ``--epochs`` epochs of the generated VOC data
    (the image and its mask map through ``segmentation_sample``, the same seeded order and crops on both sides):
    ``shard_stream`` with 2 map actors of 1 CPU on the 2-CPU cluster against ``torch.utils.data.DataLoader``
    with 2 worker processes over the same rows. Goal ≥ 0.9×. At ``--old-sizes`` also main's ingest (becd21e,
    loaded from git: one row per block, a random_shuffle per epoch, a row-wise map).
(b) Training: ``train_segmentation`` (the real stage, Ray Train, 2 workers × 0.5 CPU, one torch thread each)
    against a plain DDP loop (2 spawned gloo processes, a DataLoader with one worker process each, the same
    model, objective, optimiser and crops). Reported: the last epoch's time (images / the loop's images/s, data
    waits included), the share of it spent waiting on the input, and the whole call's wall time (start-up,
    checkpoints). Goal ≤ 1.15× per epoch. Also epoch 1's share waiting on input (the stream's start-up: goal
    < 20 %; the training workers decode their first batches themselves while the ingest actors start).

The reference sides (DataLoader workers, plain DDP ranks) run at the niceness Ray gives its worker processes
(15 by default), so that on a machine with other work running both sides compete for the CPU alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.core.torch_helpers import autocast
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.methods.registry import SEGMENTATION_OBJECTIVES, map_padding
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.train_seg import segmentation_sample, train_segmentation
from wsss_ray.training.ingest import RowSource, epoch_plan, shard_stream, steps_per_epoch, to_device, worker_indices
from wsss_ray.training.optim import build_optimizer, set_lr
from wsss_ray.training.step import TrainStep

NUM_CLASSES = 21
OLD_COMMIT = "becd21e"
# Ray starts its worker processes (Train workers, Ray Data actors) at this niceness (Ray's ``worker_niceness``,
# 15 unless RAY_worker_niceness says otherwise) so that its own daemons stay responsive. The reference sides run
# at the same niceness: on a machine with other work running, a nice-0 reference would otherwise get the CPU
# first and the ratio would measure the OS scheduler, not the ingest.
WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))


def as_ray_worker(*_: Any) -> None:
    """Take Ray's worker niceness (a DataLoader ``worker_init_fn``, or the first call in a reference rank)."""
    os.nice(max(0, WORKER_NICENESS - os.nice(0)))


def toy_records(root: Path, rows: int, size: int) -> list[dict[str, Any]]:
    """Generated VOC rows; the ground-truth mask stands in for the pseudo-mask (``label``)."""
    data = root / f"voc_{rows}_{size}"
    if not data.exists():
        make_toy_dataset(str(data), num_train=rows, num_val=2, image_size=size, num_classes=4, seed=0)
    stage = StageDir.create(str(root / f"out_{rows}_{size}"), "ingest", "toy")
    build_manifest(DatasetConfig(root=str(data), train_split="train", val_split="val"), stage)
    return [{"image_id": r["image_id"], "image_uri": r["image_uri"], "label_uri": r["mask_uri"]}
            for r in load_manifest(stage, "train")]


def sample_kwargs(crop: int) -> dict[str, Any]:
    config = SegTrainConfig.model_validate({"augment": {"crop_size": crop, "scale_min": 0.75, "scale_max": 1.25}})
    return {"augment": config.augment, "maps": ("label",), "num_classes": NUM_CLASSES, "padding": map_padding()}


class PlanDataset(torch.utils.data.Dataset):
    """The same rows, order and augmentation seeds as ``shard_stream`` (of one rank), for a DataLoader."""

    def __init__(self, records: list[dict[str, Any]], kwargs: dict[str, Any], epochs: range, batch: int,
                 rank: int = 0, world: int = 1) -> None:
        steps = len(records) // batch
        self.items, self.kwargs = [], kwargs
        for epoch in epochs:
            order, seeds = epoch_plan(len(records), 0, epoch)
            self.items += [{**records[i], "augment_seed": int(seeds[i])}
                           for i in worker_indices(order, steps, batch, rank, world)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = segmentation_sample(self.items[i], **self.kwargs)
        return {k: v for k, v in sample.items() if k not in ("image_id", "label_uri")}


def old_ingest(root: Path) -> Any:
    """The ingest of main at becd21e (one row per block up to 200, an all-to-all random_shuffle per epoch, a
    row-wise map, ``preserve_order``), loaded from git, to time it beside the new one."""
    path = root / "old_ingest.py"
    path.write_bytes(subprocess.check_output(["git", "show", f"{OLD_COMMIT}:wsss_ray/training/ingest.py"]))
    spec = importlib.util.spec_from_file_location("old_ingest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(batches: Iterator[dict[str, Any]], steps: int, epochs: int, batch: int) -> tuple[float, float]:
    """(seconds to the first epoch's last batch, seconds for the other epochs) of consuming ``batches``."""
    start = time.perf_counter()
    first = start
    for i, b in enumerate(batches):
        assert len(b["image"]) == batch
        if i == steps - 1:
            first = time.perf_counter()
    assert i == steps * epochs - 1
    return first - start, time.perf_counter() - first


def _old_batches(old: Any, records: list[dict[str, Any]], kwargs: dict[str, Any], epochs: int,
                 batch: int) -> Iterator[dict[str, Any]]:
    dataset = old.epoch_seeded_dataset(records, 0, segmentation_sample, kwargs)
    for _ in range(epochs):
        yield from dataset.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True)


def ingest_round(records: list[dict[str, Any]], crop: int, epochs: int, batch: int,
                 old: Any) -> dict[str, tuple[float, float]]:
    """(first epoch s, other epochs s) of every variant: Ray Data stream, DataLoader, main's ingest."""
    kwargs, steps = sample_kwargs(crop), len(records) // batch
    source = RowSource(records, segmentation_sample, kwargs, task_cpus=1.0, actors=2)
    out = {"ray": timed(shard_stream(source, 0, range(epochs), steps, batch, 0, 1, local_rows=0), steps, epochs, batch)}
    loader = torch.utils.data.DataLoader(PlanDataset(records, kwargs, range(epochs), batch), batch_size=batch,
                                         num_workers=2, drop_last=True, prefetch_factor=4,
                                         worker_init_fn=as_ray_worker)
    out["torch"] = timed(iter(loader), steps, epochs, batch)
    if old is not None:
        out["old"] = timed(_old_batches(old, records, kwargs, epochs, batch), steps, epochs, batch)
    return out


def bench_ingest(args: argparse.Namespace, root: Path) -> list[str]:
    lines = []
    for rows in args.rows:
        for size in args.sizes:
            records = toy_records(root, rows, size)
            old = old_ingest(root) if size in args.old_sizes else None
            ingest_round(records[:32], size, 2, 8, None)  # warm the page cache and Ray's worker processes
            rounds = [ingest_round(records, size, args.epochs, 8, old) for _ in range(args.reps)]
            per_epoch = (len(records) // 8) * 8
            steady = {k: per_epoch * (args.epochs - 1) / statistics.median(r[k][1] for r in rounds)
                      for k in rounds[0]}
            whole = {k: per_epoch * args.epochs / statistics.median(sum(r[k]) for r in rounds) for k in rounds[0]}
            was = (f"; main's ingest {steady['old']:6.1f} ({whole['old']:6.1f})" if "old" in steady else "")
            lines.append(f"(a) ingest {rows:5d} rows {size}²: rows/s after epoch 1 (whole run) Ray Data "
                         f"{steady['ray']:7.1f} ({whole['ray']:6.1f}), DataLoader {steady['torch']:7.1f} "
                         f"({whole['torch']:6.1f}), ratio {steady['ray'] / steady['torch']:.2f}x "
                         f"({whole['ray'] / whole['torch']:.2f}x) (goal ≥ 0.9){was}")
            print(lines[-1], flush=True)
    return lines


def seg_config(epochs: int, crop: int, workers: int = 2, use_gpu: bool = False, batch: int = 16,
               sync_bn: bool = False) -> SegTrainConfig:
    cpu_workers = {"num_workers": workers, "cpus_per_worker": 0.5, "max_failures": 0, "use_gpu": use_gpu}
    return SegTrainConfig.model_validate({
        "model": {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny", "output_stride": 8},
                  "aspp_channels": 64, "sync_bn": sync_bn},
        "epochs": epochs, "batch_size": batch, "val_every": 0, "optimizer": {"lr": 0.02, "weight_decay": 1e-4},
        "augment": {"crop_size": crop, "scale_min": 0.75, "scale_max": 1.25},
        "workers": cpu_workers if not use_gpu else {**cpu_workers, "cpus_per_worker": 2}})


def _plain_rank(rank: int, records: list[dict[str, Any]], config: SegTrainConfig, port: int, out: str,
                loader_workers: int = 1) -> None:
    """One rank of the plain DDP loop (gloo on CPU, NCCL on CUDA): what ``train_loop`` does, without Ray."""
    as_ray_worker()  # its DataLoader workers inherit it
    world = config.workers.num_workers
    device = torch.device("cuda", rank) if config.workers.use_gpu else torch.device("cpu")
    torch.set_num_threads(1 if device.type == "cpu" else 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.manual_seed(config.seed)
    epochs, crop = config.epochs, config.augment.crop_size
    batch, steps = steps_per_epoch(len(records), config.batch_size, world)
    step = TrainStep(build_segmentation_model(config.model, NUM_CLASSES),
                     SEGMENTATION_OBJECTIVES.build(config.loss, NUM_CLASSES, 0)).to(device)
    optimizer = build_optimizer(step.parameter_groups(), config.optimizer, config.head_lr_multiplier)
    ddp = torch.nn.parallel.DistributedDataParallel(step)
    loader = torch.utils.data.DataLoader(
        PlanDataset(records, sample_kwargs(crop), range(epochs), config.batch_size, rank, world), batch_size=batch,
        num_workers=loader_workers, drop_last=True, prefetch_factor=4)
    batches, times, waits = iter(loader), [], []
    for epoch in range(epochs):
        start, waited = time.perf_counter(), 0.0
        for i in range(steps):
            set_lr(optimizer, config.optimizer, epoch * steps + i, steps * epochs, steps)
            before = time.perf_counter()
            raw = next(batches)
            waited += time.perf_counter() - before
            with autocast(device):
                loss, _ = ddp(to_device({k: v.numpy() for k, v in raw.items()}, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        waits.append(waited / times[-1])
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"epoch_s": times[-1], "data_wait": waits[-1], "wait1": waits[0]}))
    dist.destroy_process_group()


def plain_ddp(records: list[dict[str, Any]], root: Path, config: SegTrainConfig,
              loader_workers: int = 1) -> dict[str, float]:
    """The plain DDP loop's last epoch: seconds and the share of it rank 0 waited on its DataLoader."""
    path = root / "plain_epoch.json"
    mp.spawn(_plain_rank, args=(records, config, _free_port(), str(path), loader_workers),
             nprocs=config.workers.num_workers, join=True)
    return json.loads(path.read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_round(records: list[dict[str, Any]], root: Path, epochs: int, crop: int, r: int) -> dict[str, float]:
    """(last epoch s, wall s) of the real stage and of the plain DDP loop."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    stage = StageDir.create(str(root / "runs"), "train_seg", f"r{r}_{len(records)}_{time.time_ns()}")
    result = train_segmentation(records, stage, seg_config(epochs, crop), NUM_CLASSES)
    out["ray_wall"] = time.perf_counter() - start
    out["ray_epoch"] = (len(records) // 16) * 16 / result["history"][-1]["images_per_s"]
    out["ray_wait"] = result["history"][-1]["data_wait"]
    out["ray_wait1"] = result["history"][0]["data_wait"]  # epoch 1: the stream's start-up included
    out["ray_rate1"] = result["history"][0]["images_per_s"]
    start = time.perf_counter()
    plain = plain_ddp(records, root, seg_config(epochs, crop))
    out["plain_wall"] = time.perf_counter() - start
    out["plain_epoch"], out["plain_wait"], out["plain_wait1"] = plain["epoch_s"], plain["data_wait"], plain["wait1"]
    return out


def bench_training(args: argparse.Namespace, root: Path) -> list[str]:
    lines = []
    for rows in args.train_rows:
        records = toy_records(root, rows, 128)
        rounds = [train_round(records, root, args.train_epochs, 128, r) for r in range(args.reps)]
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        lines.append(f"(b) train_seg {rows:5d} rows 128²: epoch {med['ray_epoch']:6.2f} s vs plain DDP "
                     f"{med['plain_epoch']:6.2f} s, ratio {med['ray_epoch'] / med['plain_epoch']:.2f}x (goal ≤ 1.15); "
                     f"waiting on input {100 * med['ray_wait']:.0f}% vs {100 * med['plain_wait']:.0f}%; "
                     f"wall of {args.train_epochs} epochs {med['ray_wall']:6.1f} s vs {med['plain_wall']:6.1f} s; "
                     f"epoch 1 waiting {100 * med['ray_wait1']:.0f}% vs {100 * med['plain_wait1']:.0f}% "
                     f"({med['ray_rate1']:.0f} images/s) (goal < 20%)")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[160, 2000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 320])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--old-sizes", type=int, nargs="*", default=[128], help="sizes that also time main's ingest")
    parser.add_argument("--train-rows", type=int, nargs="*", default=[160, 2000])
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="train_ingest_"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        lines = [] if args.skip_ingest else bench_ingest(args, root)
        lines += bench_training(args, root)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(["", f"median of {args.reps} interleaved rounds:", *lines]))


if __name__ == "__main__":
    main()
