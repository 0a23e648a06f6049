"""Pseudo-label quality of the MSPN and BANA generators on the generated VOC data.

Run it inside a loopback-only network namespace (it starts Ray):

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/generator_quality.py'

One small classifier (resnet_tiny, ~10 epochs) is trained on the toy train split, then the real stage
(``generate_pseudo_labels``) runs the ``multi_seed`` generator (tags) and the ``box`` generator (boxes) with
their paper defaults. Printed, as one table:

(a) MSPN: precision (correct / committed pixels) and coverage (committed / labelled pixels) of the clean mask
    (agreement >= t) for t = 1..S, against the single-seed mask (seed 0 alone) and the plain majority. The
    stage scores t = ``agreement`` itself; the other t are recomputed from the stored ``majority`` and
    ``agreement`` PNGs with the same formula.
(b) BANA: mIoU of Y_crf (``pseudo``), the filled-box baseline and Y_ret (``retrieved``).

The dataset is the generator's default style at a size that finishes in a few minutes on 2 cores; nothing is
tuned to favour a method.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from typing import Any

import ray

from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.image_io import read_label
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.methods.mspn.seeds import clean_mask
from wsss_ray.pipeline_config import ClassifierTrainConfig, PseudoLabelConfig
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.pseudo_labels import generate_pseudo_labels
from wsss_ray.stages.train_cls import train_classifier


def _precision_coverage(records: list[dict[str, Any]], stage: StageDir, threshold: int) -> tuple[float, float]:
    """The stage's precision / coverage formula on the clean mask at another agreement threshold."""
    correct = committed = valid = 0
    for record in records:
        target = read_label(record["mask_uri"])
        majority = read_label(stage.path("majority", f"{record['image_id']}.png"))
        agreement = read_label(stage.path("agreement", f"{record['image_id']}.png"))
        mask = clean_mask(majority, agreement, threshold)
        keep = (target != 255) & (mask != 255)
        correct += int((keep & (mask == target)).sum())
        committed += int(keep.sum())
        valid += int((target != 255).sum())
    return correct / max(committed, 1), committed / max(valid, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    # The papers' bilateral sxy (50-80) is for ~500 px VOC images; on small images it spans the whole frame.
    # None keeps the config default (50); --scale-crf sets sxy = 50 * image_size / 500.
    parser.add_argument("--scale-crf", action="store_true")
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.WARNING)

    work = tempfile.mkdtemp(prefix="genq")
    start = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        make_toy_dataset(f"{work}/voc", num_train=args.num_train, num_val=4, image_size=args.image_size,
                         num_classes=args.num_classes, seed=args.seed)
        ingest = StageDir.create(f"{work}/out", "ingest", "bench")
        build_manifest(DatasetConfig(root=f"{work}/voc", train_split="train", val_split="val"), ingest)
        records = load_manifest(ingest, "train")
        cls_config = ClassifierTrainConfig.model_validate({
            "backbone": {"name": "resnet_tiny", "output_stride": args.output_stride}, "epochs": args.epochs, "batch_size": 8,
            "augment": {"crop_size": args.image_size, "scale_min": 0.8, "scale_max": 1.2},
            "workers": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0}, "seed": args.seed})
        trained = train_classifier(records, StageDir.create(f"{work}/out", "train_cls", "bench"), cls_config, 21,
                                   "tags")
        trained_at = time.monotonic()

        def run(generator: dict[str, Any], supervision: str) -> tuple[StageDir, dict[str, Any], float]:
            t0 = time.monotonic()
            stage = StageDir.create(f"{work}/out", "pseudo_labels", generator["name"])
            summary = generate_pseudo_labels(
                records, stage, model_uri=trained["model_uri"], cls_config=cls_config,
                config=PseudoLabelConfig.model_validate({"generator": generator, "max_actors": 1}),
                num_classes=21, supervision=supervision, class_names=VOC_CLASSES)
            assert summary["failed"] == 0, summary
            return stage, summary, time.monotonic() - t0

        crf = {"bilateral_sxy": round(50 * args.image_size / 500, 1)} if args.scale_crf else {}
        ms_stage, ms, ms_seconds = run({"name": "multi_seed", "crf": crf}, "tags")
        _, box, box_seconds = run({"name": "box", "crf": crf}, "boxes")
        num_seeds, t_default = 6, 4

        rows: list[tuple[str, str, float | None, float, float]] = []
        single = ms["scores"]["single"]
        rows.append(("MSPN", "single seed (0.05, 1.0)", single["miou"], single["precision"], single["coverage"]))
        majority = ms["scores"]["majority"]
        rows.append(("MSPN", "majority of 6 (t=1)", majority["miou"], majority["precision"], majority["coverage"]))
        for t in range(2, num_seeds + 1):
            if t == t_default:
                clean = ms["scores"]["pseudo"]
                precision, coverage = clean["precision"], clean["coverage"]
            else:
                precision, coverage = _precision_coverage(records, ms_stage, t)
            rows.append(("MSPN", f"clean, agreement >= {t}" + (" (stage)" if t == t_default else ""), None,
                         precision, coverage))
        for name, label in (("pseudo", "Y_crf"), ("box_fill", "box fill"), ("retrieved", "Y_ret")):
            s = box["scores"][name]
            rows.append(("BANA", label, s["miou"], s["precision"], s["coverage"]))

        print()
        print(f"CRF {crf or 'defaults'}; classifier output stride {args.output_stride}")
        print(f"toy VOC: {len(records)} train images {args.image_size}px, {args.num_classes} classes; "
              f"classifier resnet_tiny {args.epochs} epochs (final loss {trained['history'][-1].get('loss', '?')})")
        print(f"{'method':6} {'pseudo-mask':30} {'mIoU':>6} {'precision':>10} {'coverage':>9}")
        for method, label, miou, precision, coverage in rows:
            shown = f"{miou:6.3f}" if miou is not None else f"{'-':>6}"
            print(f"{method:6} {label:30} {shown} {precision:10.3f} {coverage:9.3f}")
        print(f"\nseconds: train {trained_at - start:.0f} (incl. data + Ray start), multi_seed {ms_seconds:.0f} "
              f"({ms['mean_seconds_per_image']:.2f} s/image), box {box_seconds:.0f} "
              f"({box['mean_seconds_per_image']:.2f} s/image), total {time.monotonic() - start:.0f}")
        print("mIoU counts 255 as background (ConfusionMatrix), so it is not shown for the clean masks: compare "
              "those by precision at their coverage.")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
