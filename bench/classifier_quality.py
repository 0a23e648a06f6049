"""CAM seed and pseudo-label quality of the CAM classifiers (GAP, KTSE's ablation rows, BAP) on the toy VOC data,
with the mechanism figures of KTSE and BANA (stage 1-2). Issue #14's fidelity benchmark.

Run it inside a loopback-only network namespace (it starts Ray), on a quiet machine:

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/classifier_quality.py'

``--smoke`` runs 24 images, 4 epochs, one seed and a 30-step backbone (a check that it works, not a measurement).

Data: one toy VOC dataset (``wsss_ray.data.toy``, dataset seed 0, fixed): 160 train images at 96 px, 4
classes (``--num-train``, ``--image-size``). Every classifier is resnet_tiny (stride 16) started from ``bench/
pretrained_backbone.py``'s weights: a backbone pretrained on 8 synthetic pattern classes (spirals, hexagons,
zig-zags, ... on noise) that share no shape or texture with the toy classes, as the papers start from ImageNet
(cached under ``~/.cache/wsss-ray/bench``). Training: ``train_cls``'s defaults where the bench does not set
them (SGD lr 0.01, head ×10, wd 1e-4, poly), crop = image size, scale 0.8-1.2, batch 8 on 2 Ray Train workers
× 0.75 CPU, 27 epochs × 20 steps = 540 optimizer steps per run (10× the issue's 54; the bench refuses fewer).
KTSE's warm-up (L_cls alone) keeps its share of the run: round(27 / 4) = 7 epochs (authors: 10 of 40). Each
row is trained with three training seeds (initial head weights, shuffles, crops); the data are the same for
all. Printed: mean ± sample std over the seeds, and for each claim of the papers whether it reproduced (gap >
2 × the larger std). Seeds are the outer loop and the table is printed (and the JSON written) after each, so
a run stopped early still leaves every row's first seeds.

(a) tags, rows as in KTSE's Table 6: GAP; KTSE base (GPP head + L_cls); +SIE; +SIE+SSR; +SIE+SSR+MGA. The
    seeds come from the classifier's CAMs with the ``image_cam`` generator's settings (demo.yaml's: scales 1.0,
    0.75, 1.25 + flip, max-normalised), computed here because the stage stores label maps, not CAMs: argmax
    over [bg score, CAMs of the tags] at the common bg score 0.2 and at each run's best bg score of the sweep
    ``BG_SWEEP`` (KTSE's eval sweeps it). KTSE's figures on the same seeds (bench/cam_figures.py): mean recall
    of the GT instances (re-rendered from the dataset seed: the VOC writer stores no SegmentationObject)
    binned by area (small < 1 %, medium 1-10 %, large > 10 % of the image), and the seeds' foreground
    precision. CRF mIoU: the real ``image_cam`` stage's ``pseudo`` (demo.yaml's CRF), for ``--crf-rows`` only
    (GAP and KTSE full by default: the CRF is the bench's largest cost after training).
(b) boxes, the real ``box`` stage with its defaults (BANA stage 2: the fixed softmax unary, relative-zero
    attention threshold, single-scale CAMs, ``bana_stage2`` CRF): Y_crf (``pseudo``), Y_ret (``retrieved``)
    and box-fill mIoU, for a BAP classifier and the GAP reference (the tags' GAP classifier: the box classes
    are the tags); S = {Y_crf = Y_ret}: |S|/N and Y_crf's mIoU on S; in-box pixels whose CAM (the generator's)
    is 0 for their boxes' classes: their share of the in-box pixels, the share Y_crf makes background and
    Y_crf's precision there.

All figures are pixel counts summed over the train split (GT = SegmentationClassAug) before dividing. Nothing
is tuned to favour a method. ``--json`` keeps every run's numbers, histories and the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

import ray
import torch

from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.pipeline_config import ClassifierTrainConfig, PseudoLabelConfig
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.pseudo_labels import generate_pseudo_labels, load_classifier
from wsss_ray.stages.train_cls import train_classifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classifier_figures import box_figures, ground_truth, tag_figures
from classifier_report import report
from pretrained_backbone import pretrained_backbone

# (key, label, head, loss): KTSE's Table 6 rows are switches of its loss on the KTSE (GPP) head.
TAG_ROWS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("gap", "GAP", {"name": "gap"}, {"name": "multilabel_soft_margin"}),
    ("ktse_base", "KTSE base (GPP + L_cls)", {"name": "ktse"}, {"name": "ktse", "sie": False, "ssr": False, "mga": False}),
    ("ktse_sie", "KTSE +SIE", {"name": "ktse"}, {"name": "ktse", "sie": True, "ssr": False, "mga": False}),
    ("ktse_sie_ssr", "KTSE +SIE+SSR", {"name": "ktse"}, {"name": "ktse", "sie": True, "ssr": True, "mga": False}),
    ("ktse_full", "KTSE +SIE+SSR+MGA", {"name": "ktse"}, {"name": "ktse", "sie": True, "ssr": True, "mga": True}),
]
BOX_ROWS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("gap", "GAP", {"name": "gap"}, {"name": "multilabel_soft_margin"}),
    ("bap", "BAP", {"name": "bap"}, {"name": "bap"}),
]
# demo.yaml's image_cam settings, shared by every tag row.
SCALES = [1.0, 0.75, 1.25]
BG_SCORE = 0.2
BG_SWEEP = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8]
CRF = {"bilateral_sxy": 30, "bilateral_srgb": 13}
MIN_STEPS = 540


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=27)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.75)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--only", nargs="+", choices=["tags", "boxes"], default=["tags", "boxes"])
    parser.add_argument("--crf-rows", nargs="*", default=["gap", "ktse_full"], metavar="KEY",
                        help="tag rows that also run the image_cam stage (DenseCRF pseudo-masks); the others get "
                             "their seeds from the CAMs only (the CRF costs ~0.1-0.3 s per image)")
    parser.add_argument("--skip", nargs="*", default=[], metavar="KEY",
                        help=f"classifier keys to leave out: {[k for k, *_ in TAG_ROWS]}, 'bap'")
    parser.add_argument("--backbone-steps", type=int, default=None,
                        help="pretraining steps of the backbone (default: pretrained_backbone.py's; for smoke runs)")
    parser.add_argument("--smoke", action="store_true",
                        help="24 images at 64 px, 4 epochs, one seed, a 30-step backbone: a quick check")
    parser.add_argument("--json", default="results/bench/classifier_quality.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    args = parser.parse_args()
    if args.smoke:
        args.num_train, args.image_size, args.epochs, args.seeds = 24, 64, 4, args.seeds[:1]
        args.backbone_steps = args.backbone_steps or 30
    return args


def cls_config(args: argparse.Namespace, head: dict[str, Any], loss: dict[str, Any], seed: int,
               weights: str) -> ClassifierTrainConfig:
    """train_cls's defaults with the given head, loss and seed; everything else identical across rows."""
    if loss["name"] == "ktse":  # KTSE's warm-up (L_cls alone) keeps its share of the run: 10 of 40 epochs
        loss = {"warmup_epochs": round(args.epochs / 4), **loss}
    return ClassifierTrainConfig.model_validate({
        "backbone": {"name": "resnet_tiny", "output_stride": 16, "weights": weights}, "head": head, "loss": loss,
        "epochs": args.epochs, "batch_size": args.batch_size,
        "augment": {"crop_size": args.image_size, "scale_min": 0.8, "scale_max": 1.2},
        "workers": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "max_failures": 0},
        "seed": seed})


class Bench:
    """One work dir, the manifest, the re-rendered GT instances and every run's numbers."""

    def __init__(self, args: argparse.Namespace, work: str, weights: str) -> None:
        self.args, self.work, self.weights, self.start = args, work, weights, time.monotonic()
        make_toy_dataset(f"{work}/voc", num_train=args.num_train, num_val=1, image_size=args.image_size,
                         num_classes=args.num_classes, seed=args.data_seed)
        ingest = StageDir.create(f"{work}/out", "ingest", "bench")
        build_manifest(DatasetConfig(root=f"{work}/voc", train_split="train", val_split="val"), ingest)
        self.records = load_manifest(ingest, "train")
        self.truth = ground_truth(self.records, args.image_size, args.num_classes, args.data_seed)
        self.runs: list[dict[str, Any]] = []
        self.models: dict[tuple[str, int], tuple[str, ClassifierTrainConfig]] = {}

    def train(self, key: str, head: dict[str, Any], loss: dict[str, Any], seed: int,
              supervision: str) -> dict[str, Any]:
        config = cls_config(self.args, head, loss, seed, self.weights)
        t0 = time.monotonic()
        out = train_classifier(self.records, StageDir.create(f"{self.work}/out", "train_cls", f"{key}-{seed}"),
                               config, 21, supervision)
        seconds = time.monotonic() - t0
        self.models[key, seed] = (out["model_uri"], config)
        history = out["history"]
        print(f"[bench] trained {key} seed {seed} in {seconds:.0f} s, final loss {history[-1].get('loss')}",
              file=sys.stderr, flush=True)
        return {"train_seconds": seconds, "history": history, "final_loss": history[-1].get("loss")}

    def pseudo(self, key: str, seed: int, generator: dict[str, Any], supervision: str) -> tuple[dict[str, Any], StageDir]:
        model_uri, config = self.models[key, seed]
        stage = StageDir.create(f"{self.work}/out", "pseudo_labels", f"{generator['name']}-{key}-{seed}")
        summary = generate_pseudo_labels(
            self.records, stage, model_uri=model_uri, cls_config=config,
            config=PseudoLabelConfig.model_validate({"generator": generator, "max_actors": 1}),
            num_classes=21, supervision=supervision, class_names=VOC_CLASSES)
        if summary["failed"]:
            raise RuntimeError(f"pseudo_labels failed on {summary['failed']} images: {summary['failures_uri']}")
        return summary, stage

    def tag_run(self, key: str, label: str, head: dict[str, Any], loss: dict[str, Any], seed: int) -> None:
        run = {"supervision": "tags", "key": key, "classifier": label, "seed": seed,
               **self.train(key, head, loss, seed, "tags")}
        t0 = time.monotonic()
        run.update(stage_cam_miou=None, crf_miou=None, summary=None)
        if key in self.args.crf_rows:
            generator = {"name": "image_cam", "scales": SCALES, "bg_score": BG_SCORE, "crf": CRF}
            summary, _ = self.pseudo(key, seed, generator, "tags")
            run.update(stage_cam_miou=summary["scores"]["cam"]["miou"],
                       crf_miou=summary["scores"]["pseudo"]["miou"], summary=summary)
        run["pseudo_seconds"] = time.monotonic() - t0
        t0 = time.monotonic()
        model = load_classifier(*self.models[key, seed], 21)
        figures = tag_figures(model, self.records, self.truth, SCALES, BG_SWEEP, BG_SCORE)
        run.update(figures=figures, figure_seconds=time.monotonic() - t0)
        self._done(run)

    def box_run(self, key: str, label: str, head: dict[str, Any], loss: dict[str, Any], seed: int) -> None:
        run: dict[str, Any] = {"supervision": "boxes", "key": key, "classifier": label, "seed": seed}
        if (key, seed) not in self.models:  # GAP: the tags' classifier (the box classes are the tags)
            run.update(self.train(key, head, loss, seed, "boxes"))
        t0 = time.monotonic()
        summary, stage = self.pseudo(key, seed, {"name": "box"}, "boxes")
        run["pseudo_seconds"] = time.monotonic() - t0
        t0 = time.monotonic()
        model_uri, config = self.models[key, seed]
        generator = PseudoLabelConfig.model_validate({"generator": {"name": "box"}}).generator
        figures = box_figures(load_classifier(model_uri, config, 21), self.records, self.truth, stage,
                              generator.scales, generator.flip)
        scores = summary["scores"]
        run.update(crf_miou=scores["pseudo"]["miou"], ret_miou=scores["retrieved"]["miou"],
                   box_fill_miou=scores["box_fill"]["miou"], figures=figures, figure_seconds=time.monotonic() - t0,
                   summary=summary)
        self._done(run)

    def _done(self, run: dict[str, Any]) -> None:
        self.runs.append(run)
        print(f"[bench] {run['supervision']} {run['key']} seed {run['seed']}: train {run.get('train_seconds', 0):.0f} s, "
              f"pseudo_labels {run['pseudo_seconds']:.0f} s, figures {run['figure_seconds']:.0f} s; "
              f"elapsed {time.monotonic() - self.start:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    args = _parse_args()
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    print(f"command: {command}", flush=True)
    steps = args.num_train // args.batch_size * args.epochs
    if steps < MIN_STEPS and not args.smoke:
        raise SystemExit(f"{steps} optimizer steps per run; the benchmark needs >= {MIN_STEPS} (raise --epochs)")
    logging.getLogger("ray").setLevel(logging.WARNING)
    # The driver computes the figures' CAMs: one thread, as the stage's CAM actor. Two OpenMP threads on a
    # loaded 2-core machine spin at their barriers: measured 11x slower (0.30 vs 0.03 s per forward).
    torch.set_num_threads(1)
    # A short backbone for smoke runs (set WSSS_BENCH_CACHE to keep it out of the real cache).
    weights = pretrained_backbone(**({"steps": args.backbone_steps} if args.backbone_steps else {}))
    work = tempfile.mkdtemp(prefix="clsq")
    start = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        bench = Bench(args, work, weights)
        if any(weak_tags(r, "boxes") != weak_tags(r, "tags") for r in bench.records):
            raise SystemExit("the box classes differ from the tags: the GAP box rows would need their own classifier")
        # Seeds outermost, the table after each: a run stopped early still leaves every row's first seeds.
        for done, seed in enumerate(args.seeds, start=1):
            for key, label, head, loss in TAG_ROWS:
                if "tags" in args.only and key not in args.skip:
                    bench.tag_run(key, label, head, loss, seed)
            if "boxes" in args.only:
                for key, label, head, loss in BOX_ROWS:
                    if key not in args.skip:
                        bench.box_run(key, label, head, loss, seed)
            results = {"command": command, "args": vars(args), "steps_per_run": steps, "weights": weights,
                       "bg_score": BG_SCORE, "bg_sweep": BG_SWEEP, "scales": SCALES, "crf": CRF,
                       "seeds_done": args.seeds[:done], "runs": bench.runs, "total_seconds": time.monotonic() - start}
            if done < len(args.seeds):
                print(f"\n===== after {done} of {len(args.seeds)} seeds (partial) =====")
            report(results)
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
            print(f"json: {args.json}", flush=True)
    finally:
        ray.shutdown()
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
