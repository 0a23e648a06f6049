"""``gpu_check.py``'s speed rows: paper-size steps against torchvision, the speed options side by side (with the
profile and the compiled-vs-eager loss curve), pseudo-labelling and evaluation on the GPU.

Each row is ``row(args) -> (status, detail)`` in its own process; parts print ``ROW_PARTIAL`` lines as they end.
A "step" is what the training loop runs: forward of model + objective under the loop's autocast (bf16 on CUDA),
backward, SGD; images/s over ``repeats`` steps after ``warmup``, synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from gpu_rows import Row, device_of, partial, start_ray, sync

from wsss_ray.core.config_base import SegModelConfig, SpeedConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.core.torch_helpers import autocast
from wsss_ray.methods.registry import SEGMENTATION_OBJECTIVES
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.training.optim import build_optimizer
from wsss_ray.training.speed import compile_step, optimizer_options, prepare_step
from wsss_ray.training.step import TrainStep

NUM_CLASSES = 21
OPTIMIZER = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
Step = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def paper_shapes(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], int, int]]:
    """(title, model config, crop, batch): the paper-size steps the GPU README measured (toy sizes dry)."""
    if args.dry_run:
        return [("v2 tiny os8 64² b2 (dry run)", {"name": "deeplab_v2", "backbone": {"name": "resnet_tiny",
                                                                                     "output_stride": 8}}, 64, 2)]
    r101 = {"name": "resnet101"}
    return [("ours DeepLab-v2 R101 os8 321² b10", {"name": "deeplab_v2", "backbone": {**r101, "output_stride": 8}},
             321, 10),
            ("ours DeepLab-v3 R101 os16 321² b10", {"name": "deeplab_v3", "backbone": {**r101, "output_stride": 16}},
             321, 10),
            ("ours DeepLab-v3+ R101 os16 465² b8",
             {"name": "deeplab_v3plus", "backbone": {**r101, "output_stride": 16}}, 465, 8)]


def batches(device: torch.device, crop: int, batch: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch, 3, crop, crop, generator=generator).to(device),
             "label": torch.randint(0, NUM_CLASSES, (batch, crop, crop), generator=generator).to(device)}
            for _ in range(count)]


def our_step(model: dict[str, Any], device: torch.device, speed: SpeedConfig, seed: int = 0) -> Step:
    """The loop's step on one device (no DDP): model + cross-entropy objective, SGD, the speed options."""
    from wsss_ray.pipeline_config import SegTrainConfig

    config = SegTrainConfig.model_validate({"model": model, "optimizer": OPTIMIZER})
    torch.manual_seed(seed)
    step = prepare_step(TrainStep(build_segmentation_model(config.model, NUM_CLASSES),
                                  SEGMENTATION_OBJECTIVES.build(config.loss, NUM_CLASSES, 0)), speed, device).train()
    optimizer = build_optimizer(step.parameter_groups(), config.optimizer, 1.0, **optimizer_options(speed, device))
    forward = compile_step(step, speed, device)

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device):
            loss, _ = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return run


def torchvision_step(device: torch.device) -> Step | None:
    """torchvision's deeplabv3_resnet101 (os8) in a plain loop, as its reference ``train.py`` runs it."""
    try:
        from torchvision.models.segmentation import deeplabv3_resnet101
    except ImportError:
        return None
    torch.manual_seed(0)
    model = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), **OPTIMIZER)

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device):
            loss = F.cross_entropy(model(batch["image"])["out"], batch["label"], ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return run


def time_steps(step: Step, data: list[dict[str, torch.Tensor]], device: torch.device, warmup: int) -> float:
    """Seconds per step (median over the timed steps; each synchronised) after ``warmup`` steps."""
    for batch in data[:warmup]:
        step(batch)
    times = []
    for batch in data[warmup:]:
        sync(device)
        start = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_tflop(step: Step, batch: dict[str, torch.Tensor]) -> float:
    """TFLOP of one step (forward + backward; torch's FLOP counter: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops() / 1e12


def measure(title: str, step: Step, args: argparse.Namespace, crop: int, batch: int) -> str:
    device = device_of(args)
    warmup, timed = (1, 2) if args.dry_run else (3, 10)
    data = batches(device, crop, batch, warmup + timed)
    seconds = time_steps(step, data, device, warmup)
    tflop = step_tflop(step, data[0])
    share = f", {100 * tflop / seconds / args.peak_tflops:.1f}% of {args.peak_tflops:.0f}" if args.peak_tflops else ""
    line = (f"{title}: {batch / seconds:.1f} images/s, {seconds * 1e3:.1f} ms/step, {tflop:.3g} TFLOP/step, "
            f"{tflop / seconds:.3g} TFLOP/s{share}")
    partial(line)
    return line


def row_paper_steps(args: argparse.Namespace) -> Row:
    device = device_of(args)
    lines = []
    for index, (title, model, crop, batch) in enumerate(paper_shapes(args)):
        lines.append(measure(title, our_step(model, device, SpeedConfig()), args, crop, batch))
        if index == 0:  # torchvision's at the first (DeepLab-v2 os8) size, right after ours
            reference = torchvision_step(device)
            lines.append(measure(f"torchvision deeplabv3_resnet101 os8 {crop}² b{batch}", reference, args, crop, batch)
                         if reference is not None else "torchvision not installed: no reference")
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return "PASS", "; ".join(lines)


SPEED_OPTIONS: list[tuple[str, SpeedConfig]] = [
    ("channels_last", SpeedConfig(channels_last=True)), ("fused SGD", SpeedConfig(optimizer_impl="fused")),
    ("foreach SGD", SpeedConfig(optimizer_impl="foreach")), ("cudnn_benchmark", SpeedConfig(cudnn_benchmark=True)),
    ("compile", SpeedConfig(compile=True))]


def profile_summary(step: Step, data: list[dict[str, torch.Tensor]], device: torch.device) -> str:
    """The eager step's top operators by device (CUDA) or CPU self time, over two profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step(data[0])
    with profile(activities=activities) as prof:
        for batch in data[1:3]:
            step(batch)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:5]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1
    return ", ".join(f"{e.key[:40]} {100 * getattr(e, key) / total:.0f}%" for e in events)


def run_curve(model: dict[str, Any], device: torch.device, speed: SpeedConfig,
              data: list[dict[str, torch.Tensor]], warmup: int) -> tuple[list[float], float]:
    """(loss of every step, median seconds of the steps after ``warmup``) of a fresh step from one seed (3) on
    ``data``: the same start and batches for every variant, so the loss curves compare too."""
    step = our_step(model, device, speed, seed=3)
    losses, times = [], []
    for batch in data:
        sync(device)
        start = time.perf_counter()
        losses.append(float(step(batch)))  # a host sync each step, as both sides pay it
        times.append(time.perf_counter() - start)
    return losses, statistics.median(times[warmup:])


def row_speed(args: argparse.Namespace) -> Row:
    """Each option on against the eager default on DeepLab-v2 R101 os8 321² b10, then the compiled loss curve
    against the eager one (same seed, same batches; the compiled run is also the compile option's timing)."""
    device = device_of(args)
    title, model, crop, batch = paper_shapes(args)[0]
    warmup, steps = (1, 3) if args.dry_run else (3, 12)
    data = batches(device, crop, batch, steps, seed=7)
    lines = [f"profile of the eager step ({title}): {profile_summary(our_step(model, device, SpeedConfig()), data, device)}"]
    partial(lines[0])
    run_curve(model, device, SpeedConfig(), data, warmup)  # a warm-up run: the first variant must not pay start-up
    eager, base = run_curve(model, device, SpeedConfig(), data, warmup)
    lines.append(f"eager default {batch / base:.1f} images/s")
    partial(lines[-1])
    wins, curve_ok = [], False
    for name, speed in SPEED_OPTIONS:
        try:
            losses, on = run_curve(model, device, speed, data, warmup)
        except Exception as error:  # noqa: BLE001 - one option failing must not hide the others
            lines.append(f"{name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            partial(lines[-1])
            continue
        ratio = base / on
        wins += [name] if ratio > 1.03 else []
        lines.append(f"{name} {batch / on:.1f} images/s = {ratio:.2f}x ({'wins' if ratio > 1.03 else 'no win'})")
        partial(lines[-1])
        if speed.compile:
            worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(eager, losses, strict=True))
            curve_ok = worst <= 0.05  # bf16 noise: 5 % relative at every step
            lines.append(f"loss curve compiled vs eager over {steps} steps: worst relative gap {100 * worst:.2f}% "
                         f"(eager {[round(v, 3) for v in eager[::4]]}, compiled {[round(v, 3) for v in losses[::4]]})")
            partial(lines[-1])
    note = "options are CUDA-only: on CPU every variant is the eager default (dry run)" if args.dry_run else \
        f"winners (set SpeedConfig's CUDA defaults from these after review): {wins or 'none'}"
    return ("PASS" if curve_ok else "FAIL"), "; ".join([*lines, note])


def toy_voc(args: argparse.Namespace, count: int, size: int) -> list[dict[str, Any]]:
    from wsss_ray.data.toy import make_toy_dataset
    from wsss_ray.data.voc import VocReader

    root = str(args.root / f"pl_{count}_{size}")
    make_toy_dataset(root, num_train=count, num_val=1, image_size=size, num_classes=4, seed=11)
    reader = VocReader(root)
    return [reader.parse(item) for item in reader.items("train")]


def row_pseudo_labels(args: argparse.Namespace) -> Row:
    """The demo's generator (image CAMs at 3 scales, CRF) with an untrained resnet_tiny classifier."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return "SKIP", "pydensecrf2 is not installed (WITH_CRF=1 builds it on the GPU machine)"
    from wsss_ray.data.classes import VOC_CLASSES
    from wsss_ray.methods.registry import build_classifier
    from wsss_ray.pipeline_config import ClassifierTrainConfig, PseudoLabelConfig
    from wsss_ray.stages.pseudo_labels import CamActor, generate_pseudo_labels, refine_and_write

    count, size = (12, 64) if args.dry_run else (160, 128)
    records = toy_voc(args, count, size)
    cls_config = ClassifierTrainConfig.model_validate({"backbone": {"name": "resnet_tiny", "output_stride": 16}})
    torch.manual_seed(0)
    model_uri = str(args.root / "cam_model.pt")
    torch.save(build_classifier(cls_config, NUM_CLASSES - 1).state_dict(), model_uri)
    config = PseudoLabelConfig.model_validate({"generator": {"name": "image_cam", "scales": [1.0, 0.75, 1.25],
                                                             "bg_score": 0.2, "crf": {"bilateral_sxy": 30,
                                                                                      "bilateral_srgb": 13}}})
    actor = CamActor(model_uri, cls_config, config.generator, NUM_CLASSES, "tags", use_gpu=not args.dry_run)
    probe = records[:min(32, count)]
    actor(probe[0])
    start = time.perf_counter()
    cams = [actor(row) for row in probe]
    cam_rate = len(probe) / (time.perf_counter() - start)
    out_uri = str(args.root / "pl_probe")
    start = time.perf_counter()
    for row in cams[:16]:
        refine_and_write(row, config.generator, out_uri, NUM_CLASSES)
    crf_rate = min(16, len(cams)) / (time.perf_counter() - start)
    partial(f"CAM {cam_rate:.0f} images/s on {actor.device}; CRF {crf_rate:.1f} images/s per CPU core")
    start_ray(args)
    stage = StageDir.create(str(args.root / "runs"), "pseudo_labels", "gpu")
    start = time.perf_counter()
    summary = generate_pseudo_labels(records, stage, model_uri=model_uri, cls_config=cls_config, config=config,
                                     num_classes=NUM_CLASSES, supervision="tags", class_names=list(VOC_CLASSES))
    wall = time.perf_counter() - start
    split = summary["split"]
    bound = {"CAM": cam_rate * split["cam_actors"], "CRF": crf_rate * split["crf_tasks"]}
    ok = summary["written"] == count
    return "PASS" if ok else "FAIL", (
        f"CAM {cam_rate:.0f} images/s per actor on {actor.device}, CRF {crf_rate:.1f} images/s per CPU core; stage "
        f"{summary['images_per_s']} images/s over {count} images at {size}² with {split['cam_actors']} CAM actor(s) "
        f"and up to {split['crf_tasks']} CRF task(s) (bounds: CAM side {bound['CAM']:.0f}, CRF side "
        f"{bound['CRF']:.0f} images/s: {min(bound, key=bound.__getitem__)}-bound, {count / min(bound.values()):.1f} s "
        f"of work; the stage took {wall:.1f} s, the rest is start-up: actors, tasks); {summary['written']} written")


def row_evaluate(args: argparse.Namespace) -> Row:
    from wsss_ray.pipeline_config import EvaluateConfig
    from wsss_ray.stages.evaluate import evaluate_segmentation

    path = args.root / "stage.json"
    if not path.exists():
        return "SKIP", "the stage row did not finish (its model is what this row evaluates)"
    trained = json.loads(path.read_text())
    records = [{**r, "split": "val"} for r in toy_voc(args, *((12, 64) if args.dry_run else (160, 320)))]
    start_ray(args)
    config = EvaluateConfig.model_validate({"scales": [1.0], "flip": True, "num_samples": 0})
    start = time.perf_counter()
    summary = evaluate_segmentation(records, StageDir.create(str(args.root / "runs"), "evaluate", "gpu"),
                                    model_uri=trained["model_uri"], model_config=SegModelConfig(**trained["model"]),
                                    config=config, num_classes=NUM_CLASSES, class_names=[str(i) for i in range(21)],
                                    score_split="val")
    seconds = time.perf_counter() - start
    miou = summary["scores"].get("miou")
    ok = summary["failed"] == 0 and miou is not None
    return "PASS" if ok else "FAIL", (
        f"{len(records)} images, {trained['model']['name']} on the model actor pool: "
        f"{len(records) / seconds:.1f} images/s including the actors' start ({seconds:.0f} s), "
        f"{summary['failed']} failed, mIoU {miou if miou is None else round(miou, 3)} (the stage row's 2-epoch toy model)")


ROWS: dict[str, Callable[[argparse.Namespace], Row]] = {
    "paper_steps": row_paper_steps, "speed": row_speed, "pseudo_labels": row_pseudo_labels,
    "evaluate": row_evaluate}
