"""What the pipeline prints at the end of a run: the per-class IoU table and the headline numbers."""

from __future__ import annotations

from typing import Any

import numpy as np

from wsss_ray.core import storage


def column_order(name: str) -> tuple[int, str]:
    """The IoU table's column order: pseudo-masks (train), then the segmentation, then the rest (background
    only). Fixed, not the dict's: a rerun reads the scores back from JSON written with sorted keys."""
    rank = 0 if name.endswith("(train)") else 1 if name.startswith("segmentation") else 2
    return rank, name


def format_iou_table(per_class: dict[str, dict[str, float | None] | None], names: list[str]) -> str:
    """Plain-text table: one row per class that is scored anywhere, one column per scored mask set."""
    columns = {k: per_class[k] for k in sorted(per_class, key=column_order) if per_class[k]}
    classes = [c for c in names if any(col.get(c) is not None for col in columns.values())]
    width = max([len(c) for c in classes] + [5])
    header = f"{'class':<{width}}  " + "  ".join(f"{name:>24}" for name in columns)
    lines = [header, "-" * len(header)]
    for cls in classes:
        cells = [col.get(cls) for col in columns.values()]
        lines.append(f"{cls:<{width}}  " + "  ".join(f"{'–' if v is None else f'{100 * v:.1f}':>24}" for v in cells))
    means = [np.mean([v for v in col.values() if v is not None]) for col in columns.values()]
    lines.append(f"{'mIoU':<{width}}  " + "  ".join(f"{100 * m:>24.1f}" for m in means))
    return "\n".join(lines)


def stage_summary_line(summary: dict[str, Any]) -> str:
    """A finished stage's headline numbers in one line (what a person reads between the progress lines)."""
    parts = [f"{summary[k]} {k.replace('_', ' ')}" for k in ("images", "failed") if isinstance(summary.get(k), int)]
    if isinstance(summary.get("images_per_s"), float):
        parts.append(f"{summary['images_per_s']:.2f} images/s")
    history = summary.get("history") or []
    if history and history[-1].get("loss") is not None:
        parts.append(f"final loss {history[-1]['loss']:.3g}")
    if history and history[-1].get("val_miou") is not None:
        parts.append(f"val mIoU {100 * history[-1]['val_miou']:.1f}")
    parts += [f"{k} mIoU {100 * v['miou']:.1f}" for k, v in (summary.get("scores") or {}).items()
              if isinstance(v, dict) and v.get("miou") is not None]
    metrics = summary.get("metrics") or {}
    if metrics.get("val_miou") is not None:
        parts.append(f"val mIoU {100 * metrics['val_miou']:.1f}")
    return ", ".join(parts)


def print_stage_summary(summaries: dict[str, Any]) -> dict[str, Any]:
    """What a run stopped with ``--until`` prints: the last stage's numbers (not its per-epoch history)."""
    name, summary = list(summaries.items())[-1]
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, (dict, list))))
    for output, scores in summary.get("scores", {}).items():
        extra = "".join(f", {k} {100 * scores[k]:.1f}" for k in ("precision", "coverage") if k in scores)
        print(f"  {output}: mIoU {100 * scores['miou']:.1f}{extra}")
    return summaries


def print_results(summaries: dict[str, Any], names: list[str], output: str, seconds: float) -> None:
    """What a finished run prints: the IoU table, the headline numbers and where the results are."""
    evaluate = summaries["evaluate"]
    metrics = evaluate["metrics"]
    print("\n" + format_iou_table(metrics["per_class_iou"], names))
    print(f"\nsegmentation val mIoU {100 * metrics['val_miou']:.1f} "
          f"(background only: {100 * metrics['background_only_miou']:.1f}); pseudo-masks: "
          + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(metrics["pseudo_mask_miou"].items())))
    # In pipeline order, not the dict's: a rerun reads them back from JSON written with sorted keys.
    failed = metrics["failed_images"]
    order = [k for k in ("ingest", "pseudo_labels", "evaluate") if k in failed] + sorted(
        k for k in failed if k not in ("ingest", "pseudo_labels", "evaluate"))
    print(f"failed images: {', '.join(f'{k} {failed[k]}' for k in order)} (list: {metrics['failures_uri']})")
    print(f"pipeline finished in {seconds:.0f}s")
    print(f"metrics: {storage.join(output, 'metrics.json')}")
    print(f"report:  {evaluate['report_uri']}")
