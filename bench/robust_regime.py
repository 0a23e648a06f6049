"""The noise-robust methods in the papers' regime: a baseline that memorises its noisy pseudo-masks, then every
method against it. Pure PyTorch, no Ray (``bench/regime_train.py`` runs each training):

    nice -n 19 .venv/bin/python bench/robust_regime.py                      # CPU, the defaults below
    .venv/bin/python bench/robust_regime.py --device cuda                   # one GPU, same runs
    .venv/bin/python bench/robust_regime.py --report /tmp/regime.json       # reprint a finished (or cut) run

1. Noise as the project's pseudo-masks have it. The toy VOC training masks (255 bands filled with the nearest
   label) are corrupted by ``wsss_ray.data.pseudo_noise.corrupt_like_pseudo`` at the rates
   ``bench/pseudo_noise_rates.py`` measured on the demo pipeline's CAM + DenseCRF pseudo-masks
   (``bench/pseudo_noise_rates.json``: whole-object swaps, boundary shifts, missing parts, spill onto the
   background), boundary shifts scaled to this image size. The corrupted masks' rates are measured back.
2. Memorisation first. The baseline (plain CE on the noisy masks) trains for ``--epochs`` with flips only (no
   scale or crop: the net sees the same pixels every epoch, as it must to memorise them); after every epoch the
   bench predicts the full training images and reports, on the noisy pixels (noisy label ≠ ground truth), the
   share predicted as their noisy label — OuT's Fig. 1 — and the share predicted right. The memorisation onset
   is the number of epochs after which the curve (mean over the baseline's seeds) never again falls below a
   quarter of its rise (``regime_report.onset``); the methods are judged only if the baseline memorises (end −
   minimum ≥ ``--memorises``).
3. The rows, each ``--seeds`` training seeds (initial weights, order, flips; the data and noise are one draw):
   clean masks (reference), the baseline, label smoothing 0.2, SCE, curriculum (ϵ 0.25 from the onset),
   robust early-learning (K 0.4), OuT online NNSS / replace / EMA (inflection = the onset, as OuT reads it off
   its Fig. 1; EMA horizon the same 5.25 % of training as OuT's v = 0.999 over 19,044 steps), BANA's NAL
   (Y_ret: prototype retrieval over colour features, as in ``robust_training.py``), MSPN's hybrid loss against
   CE on its seed majority (six seeds, each an independent corruption at the measured rates). Final val mIoU
   against the clean val masks, mean ± sample std; a direction (method > its baseline) is reproduced when the gap
   exceeds twice the larger std, reversed when the baseline wins by as much (``robust_report.verdict``).

Defaults (CPU): 64 train / 32 val images at 48², DeepLab-v3 resnet_tiny OS 8, batch 8, 8 steps × ``--epochs``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import regime_report
from regime_train import run_spec
from robust_inputs import retrieved_map
from robust_report import out_schedule

from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.data.pseudo_noise import PseudoErrorRates, corrupt_like_pseudo, fill_ignore, measure_error_rates
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.methods.mspn.seeds import proposals, vote

NUM_CLASSES = 21
RATES = BENCH / "pseudo_noise_rates.json"
MSPN_SEEDS = 6


# ------------------------------------------------------------------------------------------------- data


def _read_split(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def make_data(args: argparse.Namespace, rates: PseudoErrorRates, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The toy data in memory, the noisy masks and every method's maps; returns (arrays, static figures)."""
    root = work / "voc"
    make_toy_dataset(str(root), num_train=args.num_train, num_val=args.num_val, image_size=args.size,
                     num_classes=args.toy_classes, seed=args.data_seed)
    rng = np.random.default_rng(args.data_seed)
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "clean", "label", "retrieved", "majority",
                                                           "agreement", "proposed")}
    label_lists = []
    for image_id in _read_split(root, "train"):
        image = read_image(str(root / "JPEGImages" / f"{image_id}.jpg"))
        clean = read_label(str(root / "SegmentationClass" / f"{image_id}.png"))
        filled = fill_ignore(clean)
        tags = sorted(int(v) for v in np.unique(clean) if v not in (0, 255))
        labels = [0, *tags]
        noisy = corrupt_like_pseudo(filled, rates, rng, args.toy_classes, args.band)
        seeds = np.stack([corrupt_like_pseudo(filled, rates, rng, args.toy_classes, args.band)
                          for _ in range(MSPN_SEEDS)])
        majority, agreement = vote(seeds)
        for key, value in (("image", image), ("clean", clean), ("label", noisy), ("majority", majority),
                           ("retrieved", retrieved_map(image, noisy)),
                           ("agreement", agreement), ("proposed", proposals(seeds, labels))):
            arrays[key].append(value)
        label_lists.append(labels)
    val_ids = _read_split(root, "val")
    out = {k: np.stack(v) for k, v in arrays.items()}
    out["label_lists"] = label_lists
    out["val_image"] = np.stack([read_image(str(root / "JPEGImages" / f"{i}.jpg")) for i in val_ids])
    out["val_mask"] = np.stack([read_label(str(root / "SegmentationClass" / f"{i}.png")) for i in val_ids])
    return out, static_figures(out, args)


def static_figures(arrays: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The noisy masks' error rates measured back, and each training map's pixel accuracy and mIoU vs GT."""
    from wsss_ray.maths.metrics import ConfusionMatrix

    measured, counts = measure_error_rates(list(zip(arrays["label"], arrays["clean"], strict=True)), args.band)
    figures: dict[str, Any] = {"measured_rates": measured.as_dict(), "counts": counts}
    labelled = arrays["clean"] != 255
    for key in ("label", "majority", "retrieved"):
        cm = ConfusionMatrix(NUM_CLASSES)
        cm.update(arrays["clean"], arrays[key])
        figures[f"{key}_miou"] = float(cm.miou())
        figures[f"{key}_accuracy"] = float((arrays[key] == arrays["clean"])[labelled].mean())
    return figures


# ------------------------------------------------------------------------------------------------- rows


BASE = regime_report.BASE
MAJORITY = "MSPN: CE on the seed majority"


def rows(args: argparse.Namespace, onset: int) -> list[dict[str, Any]]:
    """Each row: name, group, train_seg overrides, the map it trains on, and its paper baseline. ``onset``: the
    baseline's memorisation onset (OuT's inflection, the curriculum's start)."""
    decay, _ = out_schedule(args.epochs, args.num_train // args.batch)  # OuT's EMA horizon, 5.25 % of the run

    def out(strategy: str) -> tuple[str, str, dict[str, Any], str, str]:
        return (f"OuT {strategy} online", "OuT", {"corrector": {"inflection_epoch": onset, "strategy": strategy,
                                                                "mode": "online", "ema_decay": decay}}, "label", BASE)

    # The clean reference (does noise cost anything here?) and the papers' headline methods first: a run cut short
    # still has them.
    table = [("clean ground truth (upper bound)", "reference", {}, "clean", None), out("nnss"),
             ("BANA: NAL (γ 7, λ 0.1)", "NAL", {"loss": {"name": "nal"}}, "label", BASE),
             (MAJORITY, "MSPN", {}, "majority", None),
             ("MSPN: hybrid (t 4)", "MSPN", {"loss": {"name": "mspn", "agreement": 4}}, "label", MAJORITY),
             ("label smoothing 0.2", "robust loss", {"loss": {"label_smoothing": 0.2}}, "label", BASE),
             ("SCE (α 0.1, β 1)", "robust loss", {"loss": {"name": "sce"}}, "label", BASE),
             ("curriculum (ϵ 0.25, from the onset)", "robust loss",
              {"loss": {"name": "curriculum", "start_epoch": onset}}, "label", BASE),
             ("robust early-learning (K 0.4)", "robust loss", {"early_learning": {"key_fraction": 0.4}}, "label",
              BASE),
             out("replace"), out("ema")]
    keys = ("row", "group", "overrides", "label_key", "baseline")
    picked = [r for r in table if not args.only or any(w in r[0] for w in args.only)]
    return [dict(zip(keys, r, strict=True)) for r in picked]


def base_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"model": {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny", "output_stride": 8},
                      "aspp_channels": args.aspp},
            "epochs": args.epochs, "batch_size": args.batch, "seed": seed,
            "optimizer": {"lr": args.lr, "weight_decay": 1e-4}}


# ------------------------------------------------------------------------------------------------- main


def run_rows(args: argparse.Namespace, arrays: dict[str, Any], report: dict[str, Any], out: Path,
             work: Path) -> None:
    """The baseline's seeds, its memorisation onset, then every other row's seeds, ``--jobs`` runs at a time (one
    process each); ``out`` rewritten after each run."""
    results: list[dict[str, Any]] = report.setdefault("runs", [])
    pool = ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) if args.jobs > 1 else None

    def run_all(specs: list[dict[str, Any]]) -> None:
        payloads = [(spec, {**base_config(args, seed), **spec["overrides"]}, arrays, args.device, args.threads,
                     str(work / "stages" / f"{len(results) + i}")) for i, (spec, seed) in
                    enumerate((spec, seed) for spec in specs for seed in range(args.seeds))]
        done = map(run_spec, payloads) if pool is None else (f.result() for f in as_completed(
            [pool.submit(run_spec, p) for p in payloads]))
        for result in done:
            results.append(result)
            out.write_text(json.dumps(report, indent=1))
            last = result["epochs"][-1]
            print(f"  {result['row']:40s} seed {result['seed']}: val mIoU {100 * last['val_miou']:5.1f}, memorised "
                  f"{100 * last['memorised']:5.1f} % ({result['seconds']:.0f} s)", flush=True)

    try:
        onset = report["onset"] = args.onset
        if onset is None:  # the baseline first: its curve says whether, and from when, it memorises
            run_all([{"row": BASE, "group": "baseline", "overrides": {}, "label_key": "label", "baseline": None}])
            curve = regime_report.mean_curve([r for r in results if r["row"] == BASE], "memorised")
            onset = regime_report.onset(curve)
            report["onset"], report["memorises"] = onset, regime_report.memorises(curve, args.memorises)
            regime_report.print_curve(results, BASE, onset, args.memorises)
            if not report["memorises"] and not args.judge_anyway:
                print("the baseline does not memorise: no method is judged (--judge-anyway runs them regardless)")
                return
        run_all(rows(args, onset if onset is not None else max(1, args.epochs // 4)))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: two threads on a loaded 2-core machine were 100× slower)")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--toy-classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--aspp", type=int, default=32, help="ASPP channels of the segmenter")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--rates", default=str(RATES), help="pseudo_noise_rates.py's JSON")
    parser.add_argument("--band", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    parser.add_argument("--memorises", type=float, default=0.15, help="final − minimum that counts as memorising")
    parser.add_argument("--judge-anyway", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only the method rows containing one of these words")
    parser.add_argument("--out", default="robust_regime.json", help="results JSON (rewritten after each run)")
    parser.add_argument("--onset", type=int, help="skip the baseline; OuT's inflection / curriculum start (epochs) "
                        "as an earlier run's baseline gave it (to split the rows over processes)")
    parser.add_argument("--report", nargs="+", help="only print the tables of these results JSONs (their runs "
                        "merged, the first one's settings and onset)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        reports = [json.loads(Path(p).read_text()) for p in args.report]
        merged = {**reports[0], "runs": [r for rep in reports for r in rep.get("runs", [])]}
        regime_report.print_all(merged)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA GPU on this machine")
    torch.set_num_threads(args.threads)
    source = json.loads(Path(args.rates).read_text())
    rates = PseudoErrorRates(**source["rates"]).scaled(args.size / source["image_size"])
    work = Path(tempfile.mkdtemp(prefix="wsss-bench-regime-"))
    report: dict[str, Any] = {"args": vars(args), "rates": rates.as_dict(), "rates_source": source["source"]}
    started = time.perf_counter()
    try:
        arrays, report["static"] = make_data(args, rates, work)
        regime_report.print_static(report)
        run_rows(args, arrays, report, Path(args.out), work)
    finally:
        report["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(report, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    regime_report.print_all(report, static=False)
    print(f"\nresults: {args.out}; wall time {report['seconds'] / 60:.1f} min on {args.device}")


if __name__ == "__main__":
    main()
