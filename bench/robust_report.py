"""The printed tables of the robust-training bench's fidelity part (``bench/robust_training.py``).

Per row: mean ± sample std over the training seeds; a paper's direction (the method beats its baseline) counts
as reproduced when the gap exceeds twice the larger of the two stds, reversed when the baseline wins by as much.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import fidelity_figures as ff

# OuT's own schedule (Table 3 setting, R-50 VOC): 18 epochs × 1058 steps, v = 0.999, corrections after 4 epochs.
OUT_EPOCHS, OUT_STEPS, OUT_DECAY, OUT_INFLECTION = 18, 1058, 0.999, 4
HORIZON_FRACTION = 1.0 / (1.0 - OUT_DECAY) / (OUT_EPOCHS * OUT_STEPS)  # 0.0525
INFLECTION_FRACTION = OUT_INFLECTION / OUT_EPOCHS  # 0.222


def out_schedule(epochs: int, steps_per_epoch: int) -> tuple[float, int]:
    """(EMA decay v, inflection epoch) at the same fractions of a run of ``epochs`` as OuT's of its own (the
    robust benches' OuT rows; here because this module needs no Ray)."""
    horizon = HORIZON_FRACTION * epochs * steps_per_epoch
    return 1.0 - 1.0 / max(horizon, 1.0), max(1, round(INFLECTION_FRACTION * epochs))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def verdict(method: tuple[float, float], baseline: tuple[float, float]) -> str:
    """'yes' / 'no' / 'reversed' for "method > baseline", with the gap in points."""
    gap, bar = method[0] - baseline[0], 2 * max(method[1], baseline[1])
    if math.isnan(bar):
        return f"{100 * gap:+.1f} (one seed)"
    word = "yes" if gap > bar else "reversed" if -gap > bar else "no"
    return f"{word} ({100 * gap:+.1f} vs 2σ {100 * bar:.1f})"


def _fmt(ms: tuple[float, float], scale: float = 100.0) -> str:
    return f"{scale * ms[0]:5.1f} ± {scale * ms[1]:4.1f}"


def by_row(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    return rows


def print_fidelity(args: argparse.Namespace, results: list[dict[str, Any]], schedule: tuple[float, int]) -> None:
    rows = by_row(results)
    val = {name: mean_std([r["val_miou"] for r in runs]) for name, runs in rows.items()}
    steps = args.epochs * (args.num_train // args.batch)
    seeds = sorted({len(runs) for runs in rows.values()})
    print(f"\nval mIoU vs clean ground truth, mean ± std over {'/'.join(map(str, seeds)) or 0} training seeds (of "
          f"{args.seeds} asked) per row ({args.epochs} epochs × "
          f"{args.num_train // args.batch} steps = {steps} steps, batch {args.batch}, {args.num_train} images at "
          f"{args.size}², pretrained backbone: {not args.no_pretrained}; OuT v = {schedule[0]:.4f}, inflection "
          f"after {schedule[1]} epochs)")
    print(f"{'method':52s} {'group':10s} {'n':>2s} {'val mIoU':>12s} {'train pred':>12s}  paper direction reproduced?")
    for name, runs in rows.items():
        base = runs[0]["baseline"]
        claim = verdict(val[name], val[base]) if base in val else ""
        train = mean_std([r["train_miou"] for r in runs])
        print(f"{name:52s} {runs[0]['group']:10s} {len(runs):2d} {_fmt(val[name]):>12s} {_fmt(train):>12s}  {claim}")
    print_rectification(rows)
    print_nal(rows)
    print_out(rows)


def print_rectification(rows: dict[str, list[dict[str, Any]]]) -> None:
    print("\ntrained segmenter on the full training images vs Ω̃ (the corrupted mask): rectification = Ω̃ wrong → "
          "prediction right, keep = Ω̃ right → prediction right (%)")
    print(f"{'method':52s} {'rectification':>14s} {'keep':>12s} {'#Ω̃ wrong':>10s}")
    for name, runs in rows.items():
        rect = mean_std([ff.ratio(r["rectification"]["rectified"], r["rectification"]["target_wrong"]) for r in runs])
        keep = mean_std([ff.ratio(r["rectification"]["kept"], r["rectification"]["target_right"]) for r in runs])
        print(f"{name:52s} {_fmt(rect):>14s} {_fmt(keep):>12s} {runs[0]['rectification']['target_wrong']:10d}")


def print_nal(rows: dict[str, list[dict[str, Any]]]) -> None:
    print("\nAUC separating right from wrong Y_crf pixels on ~S (full training images), by the trained segmenter's "
          "σ = (D_c*/max D)^7, max softmax probability, and p(c*)")
    print(f"{'method':52s} {'σ':>12s} {'max softmax':>12s} {'p(c*)':>12s}")
    for name, runs in rows.items():
        if runs[0]["group"] in ("baseline", "NAL"):
            aucs = [mean_std([r["auc"][k] for r in runs]) for k in ("sigma", "max_softmax", "p_star")]
            print(f"{name:52s} " + " ".join(f"{_fmt(a):>12s}" for a in aucs))


def print_out(rows: dict[str, list[dict[str, Any]]]) -> None:
    print("\nOuT per epoch on the training crops (mean over seeds, %): changed set X = {old ≠ 255, new ≠ 255, "
          "new ≠ old}: precision of the new labels vs the old ones they replace, |X|/valid; NNSS: ignored set "
          "I = {old ≠ 255, new = 255}: noise precision, noise recall, |I|/valid, kept precision vs the "
          "pseudo-mask's")
    print(f"{'method':22s} {'epoch':>5s} {'prec new':>8s} {'prec old':>8s} {'|X|/val':>8s} {'noise P':>8s} "
          f"{'noise R':>8s} {'|I|/val':>8s} {'kept P':>7s} {'old P':>6s}")
    keys = ("prec_new", "prec_old", "changed_share", "noise_precision", "noise_recall", "ignored_share",
            "kept_precision", "old_precision")
    for name, runs in rows.items():
        if "out_epochs" not in runs[0]:
            continue
        for epoch in sorted(runs[0]["out_epochs"], key=int):
            figures = [ff.correction_figures(r["out_epochs"][epoch]) for r in runs if epoch in r.get("out_epochs", {})]
            means = [mean_std([f[k] for f in figures])[0] for k in keys]
            print(f"{name:22s} {int(epoch) + 1:5d} " + " ".join(f"{100 * m:8.1f}" for m in means[:7])
                  + f" {100 * means[7]:6.1f}")
