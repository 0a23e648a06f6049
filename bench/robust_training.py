"""Noise-robust segmentation training: fidelity on corrupted masks with mechanism figures, and two cost ratios.

Run it inside a loopback-only network namespace (it starts Ray):

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/robust_training.py'

1. Fidelity (default; ``--smoke`` for a few-step check). The generated VOC data's training masks are corrupted,
   at a fixed seed, with the kinds of noise pseudo-masks have (``robust_inputs.corrupt``: boundaries eroded or
   dilated by 1-4 px, a class swapped for its "similar" neighbour, missing objects, spurious blobs). Every row
   trains DeepLab-v3 (resnet_tiny, output stride 8) on Ray Train with the same budget, starting from the backbone
   of ``bench/pretrained_backbone.py`` (pretrained on 8 synthetic pattern classes that share no shape or texture
   with the toy data, as the papers start from ImageNet), for 3 training seeds (initial head weights, shuffles,
   crops; the data and the noise are one fixed draw). Defaults: 120 train images at 80², batch 4 on one worker
   with 2 threads, 18 epochs × 30 steps = 540 optimizer steps. The table is val mIoU against the clean ground truth,
   mean ± sample std over the seeds; a paper's direction (method > its baseline) counts as reproduced when the
   gap exceeds twice the larger std. Method inputs come from the same corrupted masks:
   - NAL: Y_crf = the corrupted mask; Y_ret = retrieval by class prototypes over the image's colour at stride 4
     (a stand-in for the classifier features BANA uses). "BANA: Y_crf only" is CE on Y_crf, i.e. the baseline
     row (same config, same seeds), printed once;
   - CDSP: the dataset's scribbles, Ω̃ = the corrupted mask, distance maps from it (``methods.cdsp.distance``);
   - MSPN: six "seeds", each an independent corruption at half the noise, voted with ``methods.mspn.seeds.vote``.
   - OuT (online): its EMA decay v and inflection epoch are scaled to this run. OuT trains 18 epochs × 1058
     steps with v = 0.999: the teacher's horizon 1/(1 − v) = 1000 steps is 5.25 % of its 19,044 steps, and it
     corrects after 4 of 18 epochs (22 %). Here, at 540 steps: horizon 0.0525 × 540 = 28.4 steps → v = 0.965,
     inflection after round(0.222 × 18) = 4 epochs (``out_schedule``; other budgets scale the same way).
   The generator and the noise were fixed before any method ran; nothing is tuned until a method wins.
2. Mechanism figures (``bench/fidelity_figures.py``; docs/fidelity-review.md "Fidelity benchmark — mechanism
   figures"): from the stored maps, MSPN's clean precision / coverage / negative-target precision per t and NAL's
   S / ~S split; after each run, from its ``model.pt`` on the full training images, the train-set prediction mIoU,
   the rectification and keep rates against Ω̃, and the AUC of σ (and of the max softmax probability) separating
   right from wrong Y_crf pixels on ~S; during OuT's runs, a hook after the corrector scores each batch's new
   labels against the pseudo-mask crop they replace and the clean crop (both carried as extra maps through the
   same crops), per epoch.
   Budget: 10 rows × 3 seeds = 30 runs of ≈ 40 s each on 2 quiet cores (a step at 80² × 4 is 51 ms of CPU on
   one thread), ≈ 20-25 min; the robust-loss rows (label smoothing, SCE, curriculum, early-learning) are behind
   ``--robust-losses``. ``--order seeds`` runs every row once before any row twice; ``--report`` reprints the
   tables of a finished or interrupted run's ``robust_training.json`` (rewritten after every run).
3. Cost (``--cost``, ``bench/robust_cost.py``): OuT's EMA teacher step against the plain step, and the same DDP
   step on Ray Train vs plain ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fidelity_figures as ff
import robust_report
from pretrained_backbone import pretrained_backbone
from robust_cost import add_cost_arguments, run_cost
from robust_inputs import NUM_CLASSES, make_inputs, print_static, static_figures
from robust_report import out_schedule

from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import read_image, read_label
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.maths.inference import normalize
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.weights import load_weights
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.train_seg import train_segmentation
from wsss_ray.training.hooks import TrainHook

NAL_GAMMA = 7.0
# The maps the bench carries through the training crops beside the loss's: the clean mask and the raw pseudo-mask.
PROBE_MAPS = {"clean": 255, "pseudo": 255}


# ------------------------------------------------------------------------------------------------- rows


def base_config(args: argparse.Namespace, seed: int, weights: str | None) -> dict[str, Any]:
    return {"model": {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny", "output_stride": 8,
                                                          "weights": weights}, "aspp_channels": 32},
            "epochs": args.epochs, "batch_size": args.batch, "optimizer": {"lr": 0.02, "weight_decay": 1e-4},
            "augment": {"crop_size": args.size, "scale_min": 0.75, "scale_max": 1.25}, "seed": seed,
            "workers": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "max_failures": 1},
            "val_every": args.epochs}


def fidelity_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each row: name, group, train_seg overrides, the map it trains on as ``label``, and its paper baseline."""
    decay, inflection = out_schedule(args.epochs, args.num_train // args.batch)
    base = "baseline: CE on the noisy masks (= BANA Y_crf only)"
    rows = [("clean ground truth (upper bound)", "reference", {}, "clean", None),
            (base, "baseline", {}, "label", None)]
    if args.robust_losses:
        rows += [("label smoothing 0.2", "robust losses", {"loss": {"label_smoothing": 0.2}}, "label", base),
                 ("SCE (α 0.1, β 1)", "robust losses", {"loss": {"name": "sce"}}, "label", base),
                 ("curriculum (ϵ 0.25)", "robust losses", {"loss": {"name": "curriculum"}}, "label", base),
                 ("robust early-learning (K 0.4)", "robust losses", {"early_learning": {"key_fraction": 0.4}},
                  "label", base)]
    out = {strategy: (f"OuT {strategy} online", "OuT", {"corrector": {
        "inflection_epoch": inflection, "strategy": strategy, "mode": "online", "ema_decay": decay}}, "label", base)
        for strategy in ("replace", "ema", "nnss")}
    cdsp = "CDSP basic (partial CE + LS CE)"
    # Run order: each method next to its baseline, OuT's headline (NNSS) first, so that a bench cut short
    # (``--order seeds``) has the pairs.
    rows += [out["nnss"], ("BANA: NAL (γ 7, λ 0.1)", "NAL", {"loss": {"name": "nal"}}, "label", base),
             (cdsp, "CDSP", {"loss": {"name": "cdsp", "lorm": False, "distance": False}}, "label", None),
             ("CDSP + LoRM + DEL", "CDSP", {"loss": {"name": "cdsp", "lorm_channels": 16}}, "label", cdsp),
             ("MSPN: CE on the seed majority", "MSPN", {}, "majority", None),
             ("MSPN: hybrid (t 4)", "MSPN", {"loss": {"name": "mspn", "agreement": 4}}, "label",
              "MSPN: CE on the seed majority"), out["replace"], out["ema"]]
    keys = ("row", "group", "overrides", "label_key", "baseline")
    return [dict(zip(keys, r, strict=True)) for r in rows if not args.only or any(w in r[0] for w in args.only)]


# ------------------------------------------------------------------------------------------------- training


class OutProbe(TrainHook):
    """Placed after OuT's corrector: per epoch, the pixel counts of what the correction did to the batch
    (``batch["pseudo"]``, the raw pseudo-mask crop → ``batch["label"]``) against ``batch["clean"]``, written to
    ``<stage>/out_probe_rank<r>.json`` after every step (a plain file: the bench reads it after the run)."""

    def __init__(self, stage_uri: str, inflection: int) -> None:
        self.stage_uri, self.inflection, self.rank = stage_uri, inflection, 0
        self.epochs: dict[int, ff.Counts] = {}

    def on_start(self, start_epoch: int, rank: int) -> None:
        self.rank = rank

    def before_step(self, batch: dict[str, Any], epoch: int) -> dict[str, float]:
        if epoch >= self.inflection:
            arrays = [np.asarray(batch[k].cpu() if torch.is_tensor(batch[k]) else batch[k]).astype(np.int64)
                      for k in ("pseudo", "label", "clean")]
            self.epochs[epoch] = ff.add_counts(self.epochs.get(epoch, {}), ff.correction_counts(*arrays))
            path = Path(self.stage_uri) / f"out_probe_rank{self.rank}.json"
            path.write_text(json.dumps({str(e): c for e, c in self.epochs.items()}))
        return {}


def probe_hooks(config: SegTrainConfig, model: torch.nn.Module, stage_uri: str) -> list[TrainHook]:
    """After train_seg's own hooks (OuT's corrector, in this bench): the probe of what it corrected."""
    return [OutProbe(stage_uri, config.corrector.inflection_epoch)] if config.corrector is not None else []


def train_row(rows: list[dict[str, Any]], val: list[dict[str, Any]], stage: StageDir,
              config: SegTrainConfig) -> dict[str, Any]:
    """The ``train_seg`` stage, carrying ``PROBE_MAPS`` through the crops and the probe hook after OuT's."""
    # No epoch lines (callbacks=[]): the bench prints one line per run.
    return train_segmentation(rows, stage, config, NUM_CLASSES, val, callbacks=[], extra_maps=PROBE_MAPS,
                              extra_hooks=partial(probe_hooks, config))


@torch.no_grad()
def probe_model(config: SegTrainConfig, model_uri: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """After training, on the full training images: prediction mIoU vs the clean masks, rectification / keep vs
    Ω̃ (the corrupted mask), and histograms of σ, max softmax and p(c*) on ~S (Y_crf = Ω̃, Y_ret)."""
    from wsss_ray.maths.metrics import ConfusionMatrix

    model = load_weights(build_segmentation_model(config.model, NUM_CLASSES), model_uri).eval()
    cm, rect, hists = ConfusionMatrix(NUM_CLASSES), {}, {}
    for r in records:
        gt, y_crf, y_ret = (read_label(r[f"{k}_uri"]) for k in ("clean", "label", "retrieved"))
        out = model(normalize(torch.from_numpy(read_image(r["image_uri"]))[None]), with_features=True)
        logits = out["logits"][0]
        prediction = logits.argmax(0).numpy()
        cm.update(gt, prediction)
        rect = ff.add_counts(rect, ff.rectification_counts(prediction, y_crf, gt))
        # cos(φ, W_c) at feature resolution, resized like the logits: as NAL's loss computes it.
        cos = torch.einsum("ndhw,cd->nchw", F.normalize(out["features"].float(), dim=1),
                           F.normalize(model.classifier_weight().flatten(1).float(), dim=1))
        cos = F.interpolate(cos, size=logits.shape[-2:], mode="bilinear", align_corners=False)[0]
        for name, score in ff.nal_scores(logits.numpy(), cos.numpy(), y_crf, NAL_GAMMA).items():
            pos, neg = ff.score_histograms(score, y_crf, y_ret, gt)
            old = hists.get(name, (0, 0))
            hists[name] = (old[0] + pos, old[1] + neg)
    return {"train_miou": float(cm.miou()), "rectification": rect,
            "auc": {name: ff.auc_from_histograms(*h) for name, h in hists.items()}}


def run_fidelity(args: argparse.Namespace, records: list[dict[str, Any]], val: list[dict[str, Any]],
                 out: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row × seed; ``report`` (with the results so far) is rewritten after each run, so that an
    interrupted bench still leaves its finished rows (``--report`` prints their tables)."""
    weights = None if args.no_pretrained else pretrained_backbone()
    results = []
    runs = [(spec, seed) for spec in fidelity_rows(args) for seed in range(args.seeds)]
    if args.order == "seeds":  # every row once before any row twice: a cut-short bench still covers all rows
        runs.sort(key=lambda run: run[1])
    for spec, seed in runs:
        config = SegTrainConfig.model_validate({**base_config(args, seed, weights), **spec["overrides"]})
        rows = [{**r, "label_uri": r[f"{spec['label_key']}_uri"], "pseudo_uri": r["label_uri"]} for r in records]
        name = f"{spec['row'][:40]}_s{seed}".replace(" ", "_").replace("/", "_")
        stage = StageDir.create(str(out / "runs"), "train_seg", name)
        started = time.perf_counter()
        summary = train_row(rows, val, stage, config)
        result = {**{k: spec[k] for k in ("row", "group", "baseline")}, "seed": seed,
                  "val_miou": summary["history"][-1].get("val_miou"), "seconds": time.perf_counter() - started,
                  **probe_model(config, summary["model_uri"], records)}
        probe = Path(stage.uri) / "out_probe_rank0.json"
        if probe.exists():
            result["out_epochs"] = json.loads(probe.read_text())
        results.append(result)
        report["fidelity"] = results
        (out / "robust_training.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"  {spec['row']:52s} seed {seed}: val mIoU {100 * (result['val_miou'] or float('nan')):5.1f}, "
              f"train {100 * result['train_miou']:5.1f} ({result['seconds']:.0f} s)", flush=True)
    return results


# ------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=120)
    parser.add_argument("--num-val", type=int, default=48)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--cpus-per-worker", type=float, default=2.0, help="also the worker's torch threads")
    parser.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs of the local Ray (trainer + ingest)")
    parser.add_argument("--data-seed", type=int, default=0, help="the dataset and noise draw (fixed)")
    parser.add_argument("--robust-losses", action="store_true", help="add the robust-loss rows (LS, SCE, ...)")
    parser.add_argument("--no-pretrained", action="store_true", help="train from scratch (smoke checks only)")
    parser.add_argument("--smoke", action="store_true", help="12 images at 64², 2 epochs, 1 seed, from scratch")
    parser.add_argument("--order", choices=("rows", "seeds"), default="rows",
                        help="run each row's seeds together (rows) or every row per seed (seeds)")
    parser.add_argument("--only", nargs="*", help="run only the fidelity rows containing one of these words")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--cost", action="store_true", help="also run the cost section (EMA teacher, DDP)")
    parser.add_argument("--keep", help="keep the work folder here (default: a temporary folder)")
    parser.add_argument("--report", help="only print the tables of this robust_training.json (finished or not)")
    add_cost_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        args.num_train, args.num_val, args.size, args.epochs, args.seeds = 12, 4, 64, 2, 1
        args.no_pretrained = True
    return args


def print_report(path: str) -> None:
    report = json.loads(Path(path).read_text())
    args = argparse.Namespace(**report["args"])
    print_static(report["static"])
    robust_report.print_fidelity(args, report.get("fidelity", []), out_schedule(args.epochs, args.num_train // args.batch))


def main() -> None:
    args = parse_args()
    if args.report:
        print_report(args.report)
        return
    logging.getLogger("ray").setLevel(logging.WARNING)
    work = Path(args.keep or tempfile.mkdtemp(prefix="wsss-bench-robust-"))
    # Ray Train's workers unpickle the probe hook, which calls bench/fidelity_figures.py: put bench/ on their path.
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(BENCH)]))
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    report: dict[str, Any] = {"args": vars(args)}
    started = time.perf_counter()
    try:
        if not args.skip_fidelity:
            make_toy_dataset(str(work / "voc"), num_train=args.num_train, num_val=args.num_val,
                             image_size=args.size, num_classes=args.num_classes, seed=args.data_seed)
            stage = StageDir.create(str(work / "out"), "ingest", "bench")
            build_manifest(DatasetConfig(root=str(work / "voc"), train_split="train", val_split="val"), stage)
            train, val = load_manifest(stage, "train"), load_manifest(stage, "val")
            records = make_inputs(train, work / "maps", args.num_classes, args.data_seed)
            report["static"] = static_figures(records)
            print_static(report["static"])
            report["fidelity"] = run_fidelity(args, records, val, work, report)
            report["fidelity_seconds"] = time.perf_counter() - started
            robust_report.print_fidelity(args, report["fidelity"], out_schedule(args.epochs, args.num_train // args.batch))
            print(f"fidelity wall time {report['fidelity_seconds'] / 60:.1f} min")
        if args.cost:
            run_cost(args, work, report)
        (work / "robust_training.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"\nresults: {work / 'robust_training.json'}")
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
