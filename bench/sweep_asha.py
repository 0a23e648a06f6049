"""What ASHA saves against the full grid: trial-epochs to find a config within 1 mIoU point of the grid's best.

Run it inside a loopback-only network namespace (it starts Ray; see bench/README.md):

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/sweep_asha.py'

One space (learning rate × label smoothing, ``train_seg`` trials on a tiny toy config) is run twice through
``wsss_ray.tuning.sweep.run_sweep`` on the same pseudo-masks: once with FIFO (every config for every epoch, the
grid) and once with ASHA (weak configs stopped at the rungs). The grid's cost is all its trial-epochs: only
after the last trial can it tell which config is best. ASHA's cost is the trial-epochs it ran; it succeeds when
the config it picks scores, in the grid's full run of that same config, within 1 mIoU point of the grid's best
(judged on the grid's numbers because two runs of one config differ by augmentation noise). Goal: ≤ 0.5×.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from wsss_ray.data.toy import make_toy_dataset

LRS = [0.003, 0.01, 0.03, 0.1]
SMOOTHING = [0.0, 0.2]


def base_config(root: str, output: str, epochs: int) -> dict[str, Any]:
    backbone = {"name": "resnet_tiny", "output_stride": 16}
    augment = {"crop_size": 64, "scale_min": 0.9, "scale_max": 1.1}
    workers = {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0}
    return {
        "name": "bench-sweep", "output": output,
        "dataset": {"format": "voc", "root": root, "train_split": "train", "val_split": "val"},
        "train_cls": {"backbone": backbone, "epochs": 4, "batch_size": 8, "augment": augment, "workers": workers,
                      "optimizer": {"lr": 0.05, "weight_decay": 0.0001}},
        "pseudo_labels": {"generator": {"scales": [1.0], "bg_score": 0.2}},
        "train_seg": {"model": {"backbone": backbone, "aspp_channels": 16}, "epochs": epochs, "batch_size": 8,
                      "augment": augment, "workers": workers},
    }


def space(name: str, base: Path, scheduler: str, lrs: list[float], smoothing: list[float]) -> dict[str, Any]:
    return {"name": name, "base_config": str(base), "trial": "train_seg", "metric": "val_miou", "mode": "max",
            "scheduler": scheduler, "grace_period": 1, "reduction_factor": 3,
            "params": {"train_seg.optimizer.lr": {"grid": lrs}, "train_seg.loss.label_smoothing": {"grid": smoothing}}}


def key(trial: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(trial["params"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 × 2 configs, 3 epochs: a smoke run")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 5; quick 3)")
    parser.add_argument("--out", default=None, help="output folder (default: a temp dir)")
    args = parser.parse_args()
    lrs, smoothing = (LRS[1:3], SMOOTHING) if args.quick else (LRS, SMOOTHING)
    epochs = args.epochs or (3 if args.quick else 5)
    num_train = 16 if args.quick else 24

    from wsss_ray.tuning.sweep import run_sweep

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(args.out or tmp)
        data = work / "toy"
        make_toy_dataset(str(data), fmt="voc", num_train=num_train, num_val=8, image_size=64, num_classes=3, seed=7)
        base = work / "base.yaml"
        base.write_text(yaml.safe_dump(base_config(str(data), str(work / "out"), epochs)))
        results, seconds = {}, {}
        for scheduler in ("fifo", "asha"):
            path = work / f"{scheduler}.yaml"
            path.write_text(yaml.safe_dump(space(f"grid-{scheduler}", base, scheduler, lrs, smoothing)))
            start = time.monotonic()
            results[scheduler] = run_sweep(path, resume=False)
            seconds[scheduler] = time.monotonic() - start

    grid, asha = results["fifo"], results["asha"]
    final = {key(t): t["last_metric"] for t in grid["trials"]}
    best_grid = max(v for v in final.values() if v is not None)
    # ASHA's answer: the best final score among the trials it let run to the end.
    finished = [t for t in asha["trials"] if t["epochs"] == epochs and t["last_metric"] is not None]
    asha_best = max(finished, key=lambda t: t["last_metric"]) if finished else None
    picked = final.get(tuple(sorted(asha_best["params"].items()))) if asha_best else None
    print(f"\n=== ASHA vs grid: {len(grid['trials'])} configs (lr {lrs} × label smoothing {smoothing}), "
          f"{epochs} epochs each, {num_train} train images ===")
    print(f"{'config':<48} {'grid mIoU':>9} {'ASHA epochs':>11} {'ASHA mIoU':>9}")
    asha_by_key = {key(t): t for t in asha["trials"]}
    for trial in sorted(grid["trials"], key=key):
        other = asha_by_key.get(key(trial), {})
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in trial["params"].items())
        value = other.get("last_metric")
        print(f"{name:<48} {100 * (trial['last_metric'] or 0):>9.1f} {other.get('epochs', 0):>11} "
              f"{'–' if value is None else f'{100 * value:.1f}':>9}")
    print(f"grid  (FIFO): {grid['trial_epochs']:>3} trial-epochs, {seconds['fifo']:.0f}s wall (incl. shared "
          f"pipeline inputs); best final mIoU {100 * best_grid:.1f}")
    if asha_best is not None and picked is not None:
        within = 100 * (best_grid - picked) <= 1.0
        print(f"ASHA        : {asha['trial_epochs']:>3} trial-epochs, {seconds['asha']:.0f}s wall; picks "
              + ", ".join(f"{k}={v}" for k, v in asha_best["params"].items())
              + f" → grid mIoU {100 * picked:.1f} ({'within' if within else 'NOT within'} 1 point of the best),"
              f" its own run {100 * asha_best['last_metric']:.1f}")
    ratio = asha["trial_epochs"] / max(grid["trial_epochs"], 1)
    print(f"ratio ASHA / grid trial-epochs: {ratio:.2f}× (goal ≤ 0.5×); wall {seconds['asha'] / seconds['fifo']:.2f}×")


if __name__ == "__main__":
    main()
