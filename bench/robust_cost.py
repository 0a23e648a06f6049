"""The cost part of the robust-training bench (``bench/robust_training.py --cost``), side by side in one process.

1. OuT's EMA teacher: a training step with the teacher (teacher forward + EMA update) against the plain step,
   interleaved (ratio of medians, goal ≤ 1.10×), and the teacher's memory.
2. The same DDP step on Ray Train vs a plain ``torch.distributed`` loop (2 gloo processes, data in memory, runs
   alternated A/B/A/B; goal ≤ 1.05×).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from wsss_ray.core.config_base import SegModelConfig
from wsss_ray.methods.out_correction.hook import build_teacher, teacher_probabilities
from wsss_ray.models.deeplab import build_segmentation_model

NUM_CLASSES = 21
# The fidelity runs' segmenter (DeepLab-v3 / resnet_tiny), timed by the DDP comparison.
DDP_MODEL = {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny", "output_stride": 8}, "aspp_channels": 32}


def _model(args: argparse.Namespace) -> torch.nn.Module:
    return build_segmentation_model(SegModelConfig.model_validate(DDP_MODEL), NUM_CLASSES)


# OuT's schedule: 18 epochs, the teacher corrects from epoch 4 on (the EMA update runs from the first step).
OUT_EPOCHS, OUT_INFLECTION = 18, 4
# (label, teacher precision, teacher scale) of the corrected steps the cost bench times.
TEACHER_VARIANTS = [("float32 teacher (paper)", "float32", 1.0), ("auto precision", "auto", 1.0),
                    ("auto precision, scale 0.75", "auto", 0.75), ("auto precision, scale 0.5", "auto", 0.5)]


def ema_cost(args: argparse.Namespace) -> dict[str, Any]:
    """OuT's training-time overhead on a realistic model: DeepLab-v3 / ResNet-50, ``--cost-batch`` crops of
    ``--cost-size``² (OuT trains on batches of 10 at 448²; the default 2 at 224² keeps the bench short, and
    overstates the EMA update, a fixed cost per step, against a step that grows with the batch).

    Times, interleaved: the plain step; the step + EMA update (before the inflection epoch); and the corrected
    step (teacher forward + correction + step + update) for each teacher variant. Training time over OuT's
    schedule = (inflection-1 epochs of EMA-only steps + the rest corrected) / all epochs of plain steps, as the
    data loading, validation and checkpoints the two runs share cost the same in both.
    """
    from wsss_ray.methods.out_correction.correction import correct_pseudo_masks

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = SegModelConfig.model_validate({"backbone": {"name": "resnet50", "output_stride": 16}})
    model = build_segmentation_model(config, NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    teachers = {precision: build_teacher(model, 0.999, precision) for precision in ("float32", "auto")}
    x = torch.randn(args.cost_batch, 3, args.cost_size, args.cost_size)
    y = torch.randint(0, NUM_CLASSES, (args.cost_batch, args.cost_size, args.cost_size))
    valid = torch.ones_like(y, dtype=torch.bool)

    def step(teacher: str | None = None, correct: tuple[str, float] | None = None) -> float:
        start = time.perf_counter()
        target = y
        if correct is not None:
            precision, scale = correct
            ema_teacher, dtype = teachers[precision]
            probs = teacher_probabilities(ema_teacher, x, scale, dtype)
            target = correct_pseudo_masks(y, probs, valid, "nnss")
        loss = F.cross_entropy(model(x), target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if teacher is not None:
            teachers[teacher][0].update(model)
        return time.perf_counter() - start

    runs: list[tuple[str, Any]] = [("plain", {}), ("EMA update only (before the inflection epoch)", {"teacher": "auto"})]
    runs += [(label, {"teacher": precision, "correct": (precision, scale)})
             for label, precision, scale in TEACHER_VARIANTS]
    for _ in range(2):
        for _, kwargs in runs:
            step(**kwargs)
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    for r in range(args.cost_repeats):
        for label, kwargs in (runs if r % 2 == 0 else runs[::-1]):
            times[label].append(step(**kwargs))
    median = {label: statistics.median(values) for label, values in times.items()}
    plain, pre = median["plain"], median[runs[1][0]]
    whole = {label: ((OUT_INFLECTION - 1) * pre + (OUT_EPOCHS - OUT_INFLECTION + 1) * median[label])
             / (OUT_EPOCHS * plain) for label, _, _ in TEACHER_VARIANTS}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # Training state: weights + gradients + SGD momentum (+ buffers); the teacher adds weights + buffers.
    state = 3 * params + buffers
    return {"size": args.cost_size, "batch": args.cost_batch, "dtype_auto": str(teachers["auto"][1]), "step_s": median,
            "step_ratio": {label: value / plain for label, value in median.items()}, "training_ratio": whole,
            "teacher_mb": (params + buffers) / 2**20, "memory_ratio": (state + params + buffers) / state}


def _ddp_steps(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], warmup: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _batches(args: argparse.Namespace, rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(4, 3, args.ddp_size, args.ddp_size, generator=g),
             torch.randint(0, 5, (4, args.ddp_size, args.ddp_size), generator=g)) for _ in range(steps)]


def _plain_worker(rank: int, args: argparse.Namespace, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_model(args))
    times = _ddp_steps(model, _batches(args, rank, steps), warmup=3)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    args, steps = config["args"], config["steps"]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(_model(args))
    rank = ray.train.get_context().get_world_rank()
    times = _ddp_steps(model, _batches(args, rank, steps), warmup=3)
    if rank == 0:  # Ray Train V2 keeps only checkpointed metrics on the Result; a file is simpler here
        Path(config["out"]).write_text(json.dumps(times))
    ray.train.report({"median_step_s": statistics.median(times)})


def ddp_cost(args: argparse.Namespace, out: Path, steps: int = 63, rounds: int = 3) -> dict[str, Any]:
    """Median DDP step time: plain torch.distributed (spawned gloo pair) vs Ray Train, order alternated per round."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plain, on_ray = [], []
    out.mkdir(parents=True, exist_ok=True)

    def run_plain(r: int) -> None:
        path = out / f"plain_{r}.json"
        mp.spawn(_plain_worker, args=(args, 29500 + r, steps, str(path)), nprocs=2, join=True)
        plain.append(statistics.median(json.loads(path.read_text())))

    def run_ray(r: int) -> None:
        path = out / f"ray_{r}.json"
        trainer = TorchTrainer(_ray_worker, train_loop_config={"args": args, "steps": steps, "out": str(path)},
                               scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name=f"ddp_cost_{r}", storage_path=str(out / "ray")))
        trainer.fit()
        on_ray.append(statistics.median(json.loads(path.read_text())))

    for r in range(rounds):
        for side in ((run_plain, run_ray) if r % 2 == 0 else (run_ray, run_plain)):
            side(r)
    return {"plain_s": statistics.median(plain), "ray_s": statistics.median(on_ray),
            "ratio": statistics.median(on_ray) / statistics.median(plain),
            "round_ratios": [a / b for a, b in zip(on_ray, plain)]}


def run_cost(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    """Both cost comparisons (the DDP one unless ``--skip-ddp``), printed and added to ``report``."""
    report["ema"] = e = ema_cost(args)
    print(f"\nOuT EMA teacher, DeepLab-v3/ResNet-50 at {e['size']}², batch {e['batch']}, 2 threads (auto precision = "
          f"{e['dtype_auto']} here); OuT's schedule: {OUT_EPOCHS} epochs, corrections from epoch {OUT_INFLECTION}")
    print(f"{'step':48s} {'ms':>6s} {'× plain':>8s} {'training time':>14s}")
    for label, seconds in e["step_s"].items():
        whole = e["training_ratio"].get(label)
        print(f"{label:48s} {seconds * 1000:6.0f} {e['step_ratio'][label]:8.2f} "
              f"{'' if whole is None else f'{whole:.2f}×':>14s}")
    print(f"goal: training time ≤ 1.10× (paper 1.19×); teacher {e['teacher_mb']:.1f} MiB, "
          f"{e['memory_ratio']:.2f}× training-state memory")
    if not args.skip_ddp:
        report["ddp"] = d = ddp_cost(args, work / "ddp")
        print(f"DDP step, 2 gloo workers: Ray Train {d['ray_s'] * 1000:.0f} ms vs plain torch.distributed "
              f"{d['plain_s'] * 1000:.0f} ms → {d['ratio']:.3f}× (goal ≤ 1.05×); per round "
              + ", ".join(f"{r:.3f}" for r in d["round_ratios"]))


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost-size", type=int, default=224, help="crop side of the EMA teacher cost bench")
    parser.add_argument("--cost-batch", type=int, default=2, help="batch of the EMA teacher cost bench (OuT: 10)")
    parser.add_argument("--cost-repeats", type=int, default=16, help="timed steps per variant in the cost bench")
    parser.add_argument("--ddp-size", type=int, default=96, help="crop side of the DDP comparison's batches")
    parser.add_argument("--skip-ddp", action="store_true", help="skip the Ray Train vs plain DDP comparison")
