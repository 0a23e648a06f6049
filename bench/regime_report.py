"""The figures and printed tables of ``bench/robust_regime.py``: the noise, the baseline's memorisation curve, and each row's
final val mIoU with its paper direction (``robust_report.verdict``: reproduced / reversed / not separated)."""

from __future__ import annotations

from typing import Any

import torch
from robust_report import mean_std, verdict

IGNORE = 255
BASE = "baseline: CE on the noisy masks"  # the row every method here is judged against


def memorisation(prediction: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor) -> dict[str, float]:
    """On the noisy training pixels (noisy label ≠ clean label, both labelled): the share predicted as their noisy
    label (memorised) and as their clean label (right); on the clean pixels, the share predicted right."""
    labelled = (clean != IGNORE) & (noisy != IGNORE)
    wrong, right = labelled & (noisy != clean), labelled & (noisy == clean)
    n_wrong, n_right = max(int(wrong.sum()), 1), max(int(right.sum()), 1)
    return {"memorised": float((wrong & (prediction == noisy)).sum()) / n_wrong,
            "noisy_right": float((wrong & (prediction == clean)).sum()) / n_wrong,
            "clean_right": float((right & (prediction == clean)).sum()) / n_right}


def mean_curve(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Per epoch, the mean of ``key`` over the runs (all runs have the same epochs)."""
    if not runs:
        return []
    return [sum(r["epochs"][e][key] for r in runs) / len(runs) for e in range(len(runs[0]["epochs"]))]


def onset(curve: list[float], fraction: float = 0.25) -> int | None:
    """The memorisation onset: the number of epochs after which the curve never again falls below ``fraction`` of
    its rise from its minimum to its end (the mean of its last 3 epochs) — OuT's inflection, read off its Fig. 1
    the same way (corrections start at this 0-based epoch). None for an empty or falling curve. The early epochs
    swing (all-background predictions, then blobs); this reads where the curve leaves its low band for good."""
    if len(curve) < 2:
        return None
    low, end = min(curve), sum(curve[-3:]) / len(curve[-3:])
    if end <= low:
        return None
    bar = low + fraction * (end - low)
    below = [e for e, value in enumerate(curve) if value < bar]
    return below[-1] + 1 if below else 0


def memorises(curve: list[float], threshold: float) -> bool:
    return bool(curve) and curve[-1] - min(curve) >= threshold


def print_static(report: dict[str, Any]) -> None:
    s, r, m = report["static"], report["rates"], report["static"]["measured_rates"]
    print(f"noise ({report['rates_source']}), asked → measured back on the corrupted training masks:")
    print("  " + ", ".join(f"{k} {r[k]:.3f} → {m[k]:.3f}" for k in r))
    print(f"training maps vs clean masks: noisy mIoU {100 * s['label_miou']:.1f} (pixel accuracy "
          f"{100 * s['label_accuracy']:.1f} %), MSPN seed majority {100 * s['majority_miou']:.1f} "
          f"({100 * s['majority_accuracy']:.1f} %), NAL's Y_ret {100 * s['retrieved_miou']:.1f} "
          f"({100 * s['retrieved_accuracy']:.1f} %)")


def print_curve(runs: list[dict[str, Any]], row: str, at: int | None, threshold: float) -> None:
    """The memorisation curve of ``row`` (mean over its seeds), every epoch up to 20, then every few."""
    mine = [r for r in runs if r["row"] == row]
    if not mine:
        return
    curves = {k: mean_curve(mine, k) for k in ("memorised", "noisy_right", "clean_right", "val_miou", "loss")}
    n = len(curves["memorised"])
    every = max(1, n // 20)
    print(f"\nmemorisation of '{row}' (mean over {len(mine)} seeds), on the noisy training pixels: share predicted "
          f"as their noisy label (memorised) and as their clean label; clean pixels predicted right; val mIoU")
    print(f"{'epoch':>5s} {'memorised':>9s} {'noisy→GT':>8s} {'clean ok':>8s} {'val mIoU':>8s} {'loss':>6s}")
    for e in [*range(0, n, every), *([n - 1] if (n - 1) % every else [])]:
        print(f"{e + 1:5d} {100 * curves['memorised'][e]:9.1f} {100 * curves['noisy_right'][e]:8.1f} "
              f"{100 * curves['clean_right'][e]:8.1f} {100 * curves['val_miou'][e]:8.1f} {curves['loss'][e]:6.3f}")
    low = min(curves["memorised"])
    print(f"minimum {100 * low:.1f} %, final {100 * curves['memorised'][-1]:.1f} %: "
          f"{'memorises' if memorises(curves['memorised'], threshold) else 'does NOT memorise'} (threshold "
          f"{100 * threshold:.0f} points); onset: "
          f"{'none' if at is None else f'after {at} epochs (corrections / curriculum from epoch {at + 1})'}")


def print_rows(report: dict[str, Any]) -> None:
    runs = report.get("runs", [])
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_row.setdefault(r["row"], []).append(r)
    final = {name: mean_std([r["epochs"][-1]["val_miou"] for r in rs]) for name, rs in by_row.items()}
    best = {name: mean_std([max(e["val_miou"] for e in r["epochs"]) for r in rs]) for name, rs in by_row.items()}
    args = report["args"]
    print(f"\nfinal val mIoU vs clean ground truth, mean ± std over seeds ({args['epochs']} epochs, "
          f"{args['num_train']} images at {args['size']}², batch {args['batch']}, {args['device']}); best epoch beside; "
          "memorised share of the noisy training pixels at the end; s/run: CPU seconds of the run's process on "
          "a CPU (wall where not recorded), wall seconds on a GPU")
    print(f"{'method':40s} {'n':>2s} {'final mIoU':>12s} {'best epoch':>12s} {'memorised':>12s} {'s/run':>6s}  "
          "paper direction (method > its baseline)")
    for name, rs in by_row.items():
        base = rs[0]["baseline"]
        claim = verdict(final[name], final[base]) if base in final else ""
        mem = mean_std([r["epochs"][-1]["memorised"] for r in rs])
        seconds = sum(r.get("cpu_seconds", r["seconds"]) if args["device"] == "cpu" else r["seconds"]
                      for r in rs) / len(rs)
        print(f"{name:40s} {len(rs):2d} {_fmt(final[name]):>12s} {_fmt(best[name]):>12s} {_fmt(mem):>12s} "
              f"{seconds:6.0f}  {claim}")


def _fmt(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:5.1f} ± {100 * ms[1]:4.1f}"


def print_all(report: dict[str, Any], static: bool = True) -> None:
    if static and "static" in report:
        print_static(report)
    runs = report.get("runs", [])
    args = report["args"]
    print_curve(runs, BASE, report.get("onset"), args["memorises"])
    print_rows(report)
