"""The error rates of the project's own CAM + CRF pseudo-masks against the ground truth
(``wsss_ray.data.pseudo_noise``), written to ``bench/pseudo_noise_rates.json`` for ``bench/robust_regime.py``.

The pseudo-masks are the demo pipeline's (``jobs/configs/demo.yaml``: toy VOC, 160 train images at 128², 4
classes, a resnet_tiny GAP classifier, ``image_cam`` with DenseCRF). Make them, then measure (no Ray here):

    WSSS_OUTPUT=/tmp/demo-out WSSS_DATA=/tmp/toy-voc unshare -n sh -c 'ip link set lo up; \\
        RAY_AUTH_MODE=disabled .venv/bin/wsss-ray run --config jobs/configs/demo.yaml --until pseudo_labels'
    .venv/bin/python bench/pseudo_noise_rates.py --stage /tmp/demo-out/pseudo_labels-* --data /tmp/toy-voc

The pseudo-mask of image ``i`` is ``<stage>/pseudo/<i>.png``; its ground truth
``<data>/SegmentationClass/<i>.png``. Printed: the pooled rates and counts, and the rates per class of the
object (which classes swap, spill, lose parts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsss_ray.data.image_io import read_label
from wsss_ray.data.pseudo_noise import error_counts, rates_from_counts

OUTPUT = Path(__file__).resolve().parent / "pseudo_noise_rates.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="a finished pseudo_labels stage folder")
    parser.add_argument("--data", required=True, help="the VOC-layout dataset root (SegmentationClass/)")
    parser.add_argument("--band", type=int, default=2, help="pixels from an outline that count as boundary")
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()
    pseudo_dir, truth_dir = Path(args.stage) / "pseudo", Path(args.data) / "SegmentationClass"
    pseudo_files = sorted(pseudo_dir.glob("*.png"))
    if not pseudo_files:
        raise SystemExit(f"{pseudo_dir}: no pseudo-mask PNGs (is --stage a finished pseudo_labels stage?)")
    pairs = []
    for path in pseudo_files:
        truth_path = truth_dir / path.name
        if not truth_path.exists():
            raise SystemExit(f"{truth_path}: no ground truth for pseudo-mask {path}")
        pairs.append((read_label(str(path)), read_label(str(truth_path))))
    # Scored once, per class (each object is one class's): the pooled counts are the per-class counts summed.
    per_class: dict[int, dict[str, int]] = {}
    for pseudo, truth in pairs:
        for label in {int(v) for v in set(truth.ravel().tolist())} - {0, 255}:
            for key, value in error_counts(pseudo, truth, args.band, {label}).items():
                per_class.setdefault(label, {}).setdefault(key, 0)
                per_class[label][key] += value
    counts = {key: sum(c[key] for c in per_class.values()) for key in next(iter(per_class.values()))}
    rates = rates_from_counts(counts)
    print(f"{len(pairs)} pseudo-masks from {args.stage}, band {args.band} px")
    print(f"{'class':>6s} {'objects':>8s} {'swap':>6s} {'shrink px':>10s} {'grow px':>8s} {'missing':>8s} {'spill':>6s}")
    for label, c in [*sorted(per_class.items()), ("all", counts)]:
        r = rates_from_counts(c)
        print(f"{label!s:>6s} {c['objects']:8d} {r.swap:6.3f} {r.shrink_px:10.2f} {r.grow_px:8.2f} "
              f"{r.missing:8.3f} {r.spill:6.3f}")
    size = pairs[0][1].shape[0]
    Path(args.output).write_text(json.dumps({
        "rates": rates.as_dict(), "counts": counts, "band": args.band, "image_size": size, "images": len(pairs),
        "source": "demo pipeline (jobs/configs/demo.yaml) image_cam + DenseCRF pseudo-masks of the toy train split",
    }, indent=1) + "\n")
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
