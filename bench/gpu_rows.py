"""``gpu_check.py``'s training rows: the stage on Ray Train, autocast, SyncBN, OuT's teacher, the plain loop.

Each row is ``row(args) -> (status, detail)`` and runs in its own process (``gpu_check.py`` spawns it); rows
print ``ROW_PARTIAL`` lines as they finish parts, so a row cut short by its time limit still reports them. The
``stage`` row leaves ``stage.json`` in ``args.root`` for the rows that reuse its model and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wsss_ray.core.stage_dir import StageDir
from wsss_ray.core.torch_helpers import autocast
from wsss_ray.methods.out_correction.correction import correct_pseudo_masks
from wsss_ray.methods.out_correction.hook import build_teacher, teacher_probabilities
from wsss_ray.methods.registry import SEGMENTATION_OBJECTIVES
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.training.step import TrainStep

Row = tuple[str, str]  # (PASS / FAIL / SKIP, detail)


def partial(message: str) -> None:
    """A finished part of a row: the parent shows it if the row is cut short."""
    print(f"ROW_PARTIAL {message}", flush=True)


def gpus(args: argparse.Namespace) -> int:
    return 0 if args.dry_run else torch.cuda.device_count()


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device("cpu" if args.dry_run else "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def start_ray(args: argparse.Namespace) -> None:
    import ray

    os.environ.setdefault("WSSS_AUTOSCALING", "0")
    ray.init(address="local", num_cpus=2 if args.dry_run else None, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    ray.data.DataContext.get_current().enable_progress_bars = False


def sizes(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """(rows, crop, epochs, batch per GPU) of the stage rows."""
    return (32, 64, 2, 2) if args.dry_run else (160, 320, 2, 8)


def stage_config(args: argparse.Namespace, sync_bn: bool = False, workers: int | None = None) -> SegTrainConfig:
    """The ``stage`` row's config: max(2, GPUs) workers with ``use_gpu: auto`` (sized to the cluster by
    ``plan_workers``), bf16 on CUDA, a resnet_tiny DeepLab-v3 (the toy model the GPU README measured)."""
    from train_ingest import seg_config

    _, crop, epochs, batch = sizes(args)
    count = workers or max(2, gpus(args))
    config = seg_config(epochs, crop, workers=count, use_gpu=not args.dry_run, batch=batch * count, sync_bn=sync_bn)
    use_gpu: bool | str = False if args.dry_run else ("auto" if workers is None else True)
    return config.model_copy(update={"workers": config.workers.model_copy(update={"use_gpu": use_gpu})})


def stage_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    from train_ingest import toy_records

    rows, crop, _, _ = sizes(args)
    return toy_records(args.root, rows, crop)


def row_stage(args: argparse.Namespace) -> Row:
    from wsss_ray.stages.train_seg import train_segmentation

    start_ray(args)
    records, config = stage_records(args), stage_config(args)
    stage = StageDir.create(str(args.root / "runs"), "train_seg", "stage")
    result = train_segmentation(records, stage, config, 21)
    history = result["history"]
    losses = [h["loss"] for h in history]
    world = history[-1]["world_size"]
    images = (len(records) // config.batch_size) * config.batch_size
    (args.root / "stage.json").write_text(json.dumps({
        "model_uri": result["model_uri"], "model": config.model.model_dump(mode="json"), "world": world,
        "epoch_s": images / history[-1]["images_per_s"], "images_per_s": history[-1]["images_per_s"]}))
    ok = all(torch.isfinite(torch.tensor(losses))) and result.get("model_sha256")
    backend = "gloo (dry run)" if args.dry_run else "NCCL"
    return "PASS" if ok else "FAIL", (
        f"{backend}, {config.workers.num_workers} workers asked with use_gpu {config.workers.use_gpu}, {world} "
        f"placed; losses {[round(v, 3) for v in losses]}; epoch 1 {history[0]['images_per_s']:.0f} images/s, "
        f"{100 * history[0]['data_wait']:.0f}% waiting on input; last epoch {history[-1]['images_per_s']:.0f} "
        f"images/s, {100 * history[-1]['data_wait']:.0f}% waiting")


def row_autocast(args: argparse.Namespace) -> Row:
    """One training step under the loop's autocast. On the CPU (dry run) CPU bf16 autocast stands in for the
    loop's (a no-op there), so the row's own checks run."""
    device = device_of(args)
    config = stage_config(args)
    _, crop, _, batch = sizes(args)
    step = TrainStep(build_segmentation_model(config.model, 21), SEGMENTATION_OBJECTIVES.build(config.loss, 21, 0))
    step = step.to(device).train()
    conv_dtypes: list[torch.dtype] = []
    for module in step.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, out: conv_dtypes.append(out.dtype))
    logits_dtype: list[torch.dtype] = []
    step.model.register_forward_hook(lambda _m, _i, out: logits_dtype.append(out.dtype))
    batch_data = {"image": torch.randn(batch, 3, crop, crop, device=device),
                  "label": torch.randint(0, 21, (batch, crop, crop), device=device)}
    context = autocast(device) if device.type == "cuda" else torch.autocast("cpu", dtype=torch.bfloat16)
    with context:
        loss, _ = step(batch_data)
    loss.backward()
    missing = [n for n, p in step.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in step.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    bf16 = sum(d == torch.bfloat16 for d in conv_dtypes)
    ok = bf16 == len(conv_dtypes) > 0 and bool(torch.isfinite(loss)) and not missing and not bad
    return "PASS" if ok else "FAIL", (
        f"{bf16}/{len(conv_dtypes)} convolutions in bf16, logits {logits_dtype[-1]}, loss {loss.dtype} "
        f"{float(loss):.3f}, parameters without a gradient {missing[:3] or 'none'}, non-finite gradients "
        f"{bad[:3] or 'none'}" + ("; CPU bf16 autocast (dry run)" if device.type == "cpu" else ""))


def row_sync_bn(args: argparse.Namespace) -> Row:
    from wsss_ray.stages.train_seg import train_segmentation

    count = gpus(args)
    if count == 1:
        return "SKIP", "one GPU: SyncBatchNorm needs two or more workers on CUDA"
    start_ray(args)
    config = stage_config(args, sync_bn=True, workers=count or 2)
    result = train_segmentation(stage_records(args), StageDir.create(str(args.root / "runs"), "train_seg", "syncbn"),
                                config, 21)
    losses = [round(h["loss"], 3) for h in result["history"]]
    if not count:
        return "SKIP", f"no CUDA; the stage with sync_bn: true ran on CPU (BatchNorm kept), losses {losses}"
    ok = all(torch.isfinite(torch.tensor(losses)))
    return "PASS" if ok else "FAIL", f"{count} workers with SyncBatchNorm, losses {losses}"


def row_teacher(args: argparse.Namespace) -> Row:
    device = device_of(args)
    size, batch, repeats = (64, 2, 2) if args.dry_run else (448, 10, 12)  # OuT's crop and batch on the GPU
    model = build_segmentation_model(stage_config(args).model, 21).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    teacher, dtype = build_teacher(model, 0.999, "auto")
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 21, (batch, size, size), device=device)
    valid = torch.ones_like(y, dtype=torch.bool)

    def step(corrected: bool) -> float:
        sync(device)
        start = time.perf_counter()
        target = correct_pseudo_masks(y, teacher_probabilities(teacher, x, 1.0, dtype), valid, "nnss") \
            if corrected else y
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if corrected:
            teacher.update(model)
        sync(device)
        return time.perf_counter() - start

    for _ in range(2):
        step(False), step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for corrected in ((False, True) if r % 2 == 0 else (True, False)):
            times[corrected].append(step(corrected))
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    return "PASS", (f"{ratio:.2f}x per step (teacher {dtype}, batch {batch} at {size}², "
                    f"plain step {statistics.median(times[False]) * 1e3:.0f} ms)")


def row_plain_loop(args: argparse.Namespace) -> Row:
    from train_ingest import plain_ddp

    path = args.root / "stage.json"
    if not path.exists():
        return "SKIP", "the stage row did not finish (its last epoch is the comparison's other side)"
    stage = json.loads(path.read_text())
    config = stage_config(args, workers=stage["world"] if not args.dry_run else 2)
    plain = plain_ddp(stage_records(args), Path(args.root), config, 1 if args.dry_run else 4)
    ratio = stage["epoch_s"] / plain["epoch_s"]
    return "PASS", (f"last epoch {stage['epoch_s']:.2f} s on Ray Train vs {plain['epoch_s']:.2f} s plain: "
                    f"{ratio:.2f}x ({stage['world']} workers; plain loop waiting on input "
                    f"{100 * plain['data_wait']:.0f}%)")


ROWS: dict[str, Callable[[argparse.Namespace], Row]] = {
    "stage": row_stage, "autocast": row_autocast, "sync_bn": row_sync_bn, "teacher": row_teacher,
    "plain_loop": row_plain_loop}
