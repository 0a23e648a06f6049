"""The printed tables of ``bench/classifier_quality.py``: mean ± sample std over the training seeds per row, and
whether each claim of the papers reproduced (the gap exceeds twice the larger std)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

Metric = Callable[[dict[str, Any]], float | None]

TAG_METRICS: dict[str, Metric] = {
    "seed_common": lambda r: r["figures"]["common"]["seed_miou"],
    "best_bg": lambda r: r["figures"]["best_bg"],
    "seed_best": lambda r: r["figures"]["best"]["seed_miou"],
    "crf": lambda r: r["crf_miou"],
    "prec_common": lambda r: r["figures"]["common"]["precision"]["precision"],
    "small_common": lambda r: r["figures"]["common"]["recall"]["small"]["mean_recall"],
    "medium_common": lambda r: r["figures"]["common"]["recall"]["medium"]["mean_recall"],
    "large_common": lambda r: r["figures"]["common"]["recall"]["large"]["mean_recall"],
    "prec_best": lambda r: r["figures"]["best"]["precision"]["precision"],
    "small_best": lambda r: r["figures"]["best"]["recall"]["small"]["mean_recall"],
    "medium_best": lambda r: r["figures"]["best"]["recall"]["medium"]["mean_recall"],
    "large_best": lambda r: r["figures"]["best"]["recall"]["large"]["mean_recall"],
}
BOX_METRICS: dict[str, Metric] = {
    "crf": lambda r: r["crf_miou"],
    "ret": lambda r: r["ret_miou"],
    "box_fill": lambda r: r["box_fill_miou"],
    "coverage": lambda r: r["figures"]["coverage"],
    "agree_miou": lambda r: r["figures"]["agree_miou"],
    "zero_share": lambda r: r["figures"]["zero_share"],
    "zero_to_bg": lambda r: r["figures"]["zero_to_background"],
    "zero_precision": lambda r: r["figures"]["zero_precision"],
}
# (claim, (supervision, key, metric) that should be larger, the one it should beat).
CLAIMS: list[tuple[str, tuple[str, str, str], tuple[str, str, str]]] = [
    ("KTSE full > GAP, seed mIoU @ bg 0.2", ("tags", "ktse_full", "seed_common"), ("tags", "gap", "seed_common")),
    ("KTSE full > GAP, seed mIoU @ best bg", ("tags", "ktse_full", "seed_best"), ("tags", "gap", "seed_best")),
    ("+SIE > base, seed mIoU @ best bg (T6)", ("tags", "ktse_sie", "seed_best"), ("tags", "ktse_base", "seed_best")),
    ("+SIE+SSR > +SIE, seed mIoU @ best bg (T6)", ("tags", "ktse_sie_ssr", "seed_best"),
     ("tags", "ktse_sie", "seed_best")),
    ("full > +SIE+SSR, seed mIoU @ best bg (T6)", ("tags", "ktse_full", "seed_best"),
     ("tags", "ktse_sie_ssr", "seed_best")),
    ("SIE lowers large recall: base > +SIE @ 0.2", ("tags", "ktse_base", "large_common"),
     ("tags", "ktse_sie", "large_common")),
    ("SIE lowers large recall: base > +SIE @ best", ("tags", "ktse_base", "large_best"),
     ("tags", "ktse_sie", "large_best")),
    ("SSR restores it: +SIE+SSR > +SIE @ 0.2", ("tags", "ktse_sie_ssr", "large_common"),
     ("tags", "ktse_sie", "large_common")),
    ("SSR restores it: +SIE+SSR > +SIE @ best", ("tags", "ktse_sie_ssr", "large_best"),
     ("tags", "ktse_sie", "large_best")),
    ("KTSE full > GAP, large recall @ best bg", ("tags", "ktse_full", "large_best"), ("tags", "gap", "large_best")),
    ("BAP: Y_crf > box fill", ("boxes", "bap", "crf"), ("boxes", "bap", "box_fill")),
    ("BAP: Y_crf > Y_ret", ("boxes", "bap", "crf"), ("boxes", "bap", "ret")),
    ("Y_crf: BAP > GAP", ("boxes", "bap", "crf"), ("boxes", "gap", "crf")),
    ("GAP: Y_crf > box fill", ("boxes", "gap", "crf"), ("boxes", "gap", "box_fill")),
]


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std (n - 1) of the values that exist; NaN where there are too few."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """``reproduced`` when mean(a) - mean(b) > 2 × the larger std, ``reversed`` when below -2 × it."""
    gap, spread = a[0] - b[0], max(a[1], b[1])
    if math.isnan(gap) or math.isnan(spread):
        return "n/a"
    if gap > 2 * spread:
        return "reproduced"
    return "reversed" if gap < -2 * spread else "not separated"


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (supervision, key): label, seeds, seconds and (mean, std) of every metric."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault((run["supervision"], run["key"]), {"label": run["classifier"], "runs": []})
        row["runs"].append(run)
    for (supervision, _), row in rows.items():
        metrics = TAG_METRICS if supervision == "tags" else BOX_METRICS
        row["stats"] = {name: mean_std([fn(r) for r in row["runs"]]) for name, fn in metrics.items()}
        row["seeds"] = [r["seed"] for r in row["runs"]]
        row["train_seconds"] = float(np.mean([r.get("train_seconds", 0.0) for r in row["runs"]]))
    return rows


def _ms(value: tuple[float, float], width: int = 13) -> str:
    mean, std = value
    if math.isnan(mean):
        return f"{'-':>{width}}"
    return f"{mean:.3f}±{std:.3f}".rjust(width) if not math.isnan(std) else f"{mean:.3f}".rjust(width)


def _tag_table(rows: dict[tuple[str, str], dict[str, Any]], runs: list[dict[str, Any]], bg: float) -> None:
    tags = {k: v for k, v in rows.items() if k[0] == "tags"}
    if not tags:
        return
    instances = next(r for r in runs if r["supervision"] == "tags")["figures"]["common"]["recall"]
    print("\n(a) image tags, generator image_cam; GT instances: " +
          ", ".join(f"{b} {instances[b]['instances']}" for b in ("small", "medium", "large")))
    for suffix, title in (("common", f"bg score {bg}"), ("best", "each run's best bg score of the sweep")):
        print(f"\n  seeds at {title}: seed mIoU, foreground precision, mean instance recall by size")
        header = (f"  {'classifier':24} {'seed mIoU':>13} {'precision':>13} {'recall small':>13} "
                  f"{'recall medium':>13} {'recall large':>13}")
        extra = f" {'CRF mIoU':>13} {'train s':>7}" if suffix == "common" else f" {'best bg':>13}"
        print(header + extra)
        for row in tags.values():
            s = row["stats"]
            line = (f"  {row['label']:24} {_ms(s['seed_' + suffix])} {_ms(s['prec_' + suffix])} "
                    f"{_ms(s['small_' + suffix])} {_ms(s['medium_' + suffix])} {_ms(s['large_' + suffix])}")
            if suffix == "common":
                line += f" {_ms(s['crf'])} {row['train_seconds']:7.0f}"
            else:
                line += " " + ",".join(f"{r['figures']['best_bg']:.2f}" for r in row["runs"]).rjust(13)
            print(line)
    edge = max(next(iter(tags.values()))["runs"][0]["figures"]["sweep"], key=float)
    if any(str(r["figures"]["best_bg"]) == str(edge) for row in tags.values() for r in row["runs"]):
        print(f"  note: a best bg score is the sweep's largest ({edge}): the optimum may lie beyond it")


def _box_table(rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    boxes = {k: v for k, v in rows.items() if k[0] == "boxes"}
    if not boxes:
        return
    print("\n(b) boxes, generator box (BANA stage 2, fixed softmax unary): mIoU; S = {Y_crf = Y_ret}; "
          "in-box CAM = 0 pixels")
    print(f"  {'classifier':10} {'Y_crf':>13} {'Y_ret':>13} {'box fill':>13} {'|S|/N':>13} {'mIoU on S':>13} "
          f"{'CAM0/in-box':>13} {'CAM0 -> bg':>13} {'CAM0 prec':>13}")
    for row in boxes.values():
        s = row["stats"]
        print(f"  {row['label']:10} {_ms(s['crf'])} {_ms(s['ret'])} {_ms(s['box_fill'])} {_ms(s['coverage'])} "
              f"{_ms(s['agree_miou'])} {_ms(s['zero_share'])} {_ms(s['zero_to_bg'])} {_ms(s['zero_precision'])}")


def report(results: dict[str, Any]) -> None:
    """Print the tables and the claims; store the aggregate in ``results['rows']``/``['claims']``."""
    args, runs = results["args"], results["runs"]
    rows = aggregate(runs)
    print(f"\ntoy VOC: {args['num_train']} train images {args['image_size']} px, {args['num_classes']} classes, "
          f"data seed {args['data_seed']}; resnet_tiny stride 16 from the pattern-pretrained backbone, "
          f"{args['epochs']} epochs x {args['num_train'] // args['batch_size']} steps = {results['steps_per_run']} "
          f"steps, batch {args['batch_size']}, {args['workers']} worker(s); training seeds {args['seeds']}")
    print(f"tags: CAM scales {results['scales']} + flip, CRF {results['crf']}; bg sweep {results['bg_sweep']}. "
          f"mean±std over seeds (sample std); pixel counts over the train split")
    _tag_table(rows, runs, results["bg_score"])
    _box_table(rows)
    print(f"\n  {'claim (paper)':46} {'a':>13} {'b':>13} verdict (gap > 2 x larger std)")
    claims = []
    for name, a, b in CLAIMS:
        ra, rb = rows.get(a[:2]), rows.get(b[:2])
        if ra is None or rb is None:
            continue
        sa, sb = ra["stats"][a[2]], rb["stats"][b[2]]
        claims.append({"claim": name, "a": sa, "b": sb, "verdict": verdict(sa, sb)})
        print(f"  {name:46} {_ms(sa)} {_ms(sb)} {claims[-1]['verdict']}")
    print(f"\ntotal wall time {results['total_seconds']:.0f} s")
    print(f"command: {results['command']}")
    results["rows"] = {f"{k[0]}/{k[1]}": {"label": v["label"], "seeds": v["seeds"], "stats": v["stats"]}
                       for k, v in rows.items()}
    results["claims"] = claims
