"""GPU readiness in one unattended run (< 8 minutes on one CUDA GPU): prints one table.

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/gpu_check.py'

Rows (each runs on its own; a failure is a FAIL row with the error, the others still run):

1. ``train_seg on Ray Train, NCCL``: the real stage on a local Ray cluster with ``use_gpu: true`` (one worker
   per GPU, NCCL process group, bf16 autocast in the loop), 2 epochs of generated VOC data; PASS if the losses
   are finite and the model exported.
2. ``bf16 autocast``: a DeepLab forward under the loop's autocast gives bf16 logits, the loss is finite and the
   backward fills every gradient.
3. ``SyncBN``: the stage with ``sync_bn: true`` on every GPU; with one GPU torch's SyncBatchNorm (world of 1) is
   plain BatchNorm, so the row runs the stage anyway (the conversion must not break) and reports SKIP.
4. ``OuT teacher cost``: training step with OuT's corrected step (bf16 EMA teacher forward + correction + EMA
   update) against the plain step, on the GPU, interleaved, ratio of medians.
5. ``train_seg vs plain loop``: images/s of the stage's last epoch against a plain torch loop (NCCL, one process
   per GPU, DataLoader with as many worker processes as the stage's ingest actors, same model and crops).

``--dry-run`` runs every row on the CPU at toy sizes (gloo instead of NCCL; GPU-only rows report SKIP), to
check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ingest import NUM_CLASSES, plain_ddp, seg_config, toy_records

from wsss_ray.core.stage_dir import StageDir
from wsss_ray.core.torch_helpers import autocast
from wsss_ray.methods.out_correction.correction import correct_pseudo_masks
from wsss_ray.methods.out_correction.corrector import build_teacher, teacher_probabilities
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.stages.train_seg import train_segmentation

Row = tuple[str, str]  # (PASS / FAIL / SKIP, detail)


def stage_run(args: argparse.Namespace, root: Path, name: str, sync_bn: bool = False) -> dict[str, Any]:
    records = toy_records(root, args.rows, args.size)
    config = seg_config(args.epochs, args.size, workers=args.gpus or 2, use_gpu=bool(args.gpus),
                        batch=args.batch * (args.gpus or 2), sync_bn=sync_bn)
    return train_segmentation(records, StageDir.create(str(root / "runs"), "train_seg", name), config, NUM_CLASSES)


def check_stage(args: argparse.Namespace, root: Path) -> Row:
    result = stage_run(args, root, "nccl")
    losses = [h["loss"] for h in result["history"]]
    ok = all(torch.isfinite(torch.tensor(losses))) and result.get("model_sha256")
    backend = "NCCL" if args.gpus else "gloo (dry run)"
    detail = (f"{backend}, {args.gpus or 2} workers, losses {[round(v, 3) for v in losses]}, "
              f"{result['history'][-1]['images_per_s']:.1f} images/s")
    return "PASS" if ok else "FAIL", detail


def check_autocast(args: argparse.Namespace, root: Path) -> Row:
    if not args.gpus:
        return "SKIP", "no CUDA: autocast is a no-op on CPU"
    device = torch.device("cuda")
    model = build_segmentation_model(seg_config(1, args.size).model, NUM_CLASSES).to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), device=device)
    with autocast(device):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    grads = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    ok = logits.dtype == torch.bfloat16 and torch.isfinite(loss) and grads
    return "PASS" if ok else "FAIL", f"logits {logits.dtype}, loss {float(loss):.3f}, finite gradients {grads}"


def check_sync_bn(args: argparse.Namespace, root: Path) -> Row:
    if args.gpus < 2:
        reason = "no CUDA" if not args.gpus else "one GPU: SyncBatchNorm with a world of 1 is plain BatchNorm"
        # Still run the stage with sync_bn on: the conversion path and its CPU/one-GPU fallback must not break.
        result = stage_run(args, root, "syncbn", sync_bn=True)
        return "SKIP", f"{reason}; the stage with sync_bn: true ran ({len(result['history'])} epochs)"
    result = stage_run(args, root, "syncbn", sync_bn=True)
    ok = all(torch.isfinite(torch.tensor([h["loss"] for h in result["history"]])))
    return "PASS" if ok else "FAIL", f"{args.gpus} workers with SyncBatchNorm, final loss {result['history'][-1]['loss']:.3f}"


def check_teacher_cost(args: argparse.Namespace, root: Path) -> Row:
    device = torch.device("cuda" if args.gpus else "cpu")
    size, batch = (448, 10) if args.gpus else (64, 2)  # OuT's crop and batch on the GPU
    config = seg_config(1, size).model
    model = build_segmentation_model(config, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    teacher, dtype = build_teacher(model, 0.999, "auto")
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    valid = torch.ones_like(y, dtype=torch.bool)

    def step(corrected: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
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
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        step(False), step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.cost_repeats):
        for corrected in ((False, True) if r % 2 == 0 else (True, False)):
            times[corrected].append(step(corrected))
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    return "PASS", (f"{ratio:.2f}x per step (teacher {dtype}, batch {batch} at {size}², "
                    f"plain step {statistics.median(times[False]) * 1e3:.0f} ms)")


def check_throughput(args: argparse.Namespace, root: Path) -> Row:
    records = toy_records(root, args.rows, args.size)
    workers = args.gpus or 2
    config = seg_config(args.epochs, args.size, workers=workers, use_gpu=bool(args.gpus),
                        batch=args.batch * workers)
    rounds = []
    for r in range(2):  # interleaved: stage, plain, stage, plain
        stage = StageDir.create(str(root / "runs"), "train_seg", f"throughput{r}")
        history = train_segmentation(records, stage, config, NUM_CLASSES)["history"]
        images = (len(records) // config.batch_size) * config.batch_size
        rounds.append((images / history[-1]["images_per_s"], plain_ddp(records, root, config, args.loader_workers)))
    stage_s, plain_s = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    return "PASS", (f"last epoch {stage_s:.2f} s vs plain {plain_s:.2f} s: {stage_s / plain_s:.2f}x "
                    f"({args.rows} rows at {args.size}², {workers} workers × batch {args.batch})")


CHECKS: list[tuple[str, Callable[[argparse.Namespace, Path], Row]]] = [
    ("train_seg on Ray Train (NCCL, bf16)", check_stage), ("bf16 autocast step", check_autocast),
    ("SyncBN training path", check_sync_bn), ("OuT teacher cost ratio", check_teacher_cost),
    ("train_seg vs plain torch loop", check_throughput)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only, toy sizes (checks the script)")
    parser.add_argument("--cost-repeats", type=int, default=20)
    parser.add_argument("--loader-workers", type=int, default=4)
    args = parser.parse_args()
    args.gpus = 0 if args.dry_run else torch.cuda.device_count()
    if not args.dry_run and not args.gpus:
        sys.exit("no CUDA GPU found; run with --dry-run to check the script on the CPU")
    args.rows, args.size, args.epochs, args.batch = (32, 64, 2, 2) if args.dry_run else (400, 320, 2, 8)
    args.cost_repeats = 2 if args.dry_run else args.cost_repeats
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ray.init(address="local", num_cpus=2 if args.dry_run else None, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows: list[tuple[str, str, str, float]] = []
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            status, detail = check(args, root)
        except Exception as error:  # noqa: BLE001 - the table reports every check, whatever fails
            traceback.print_exc()
            status, detail = "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        rows.append((name, status, detail, time.perf_counter() - start))
        print(f"[gpu_check] {name}: {status} ({rows[-1][3]:.0f} s)", flush=True)
    ray.shutdown()
    device = torch.cuda.get_device_name(0) if args.gpus else "CPU (dry run)"
    print(f"\nGPU check on {device}, torch {torch.__version__}, ray {ray.__version__}")
    print(f"| {'check':38} | {'result':6} | {'s':>4} | detail")
    for name, status, detail, seconds in rows:
        print(f"| {name:38} | {status:6} | {seconds:4.0f} | {detail}")


if __name__ == "__main__":
    main()
