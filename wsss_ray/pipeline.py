"""The whole pipeline: ingest → train_cls → pseudo_labels → train_seg → evaluate (+ report).

Each stage is a plain function of its inputs writing below ``<output>/<stage>-<key>``; this module only chains
them. A stage whose ``_SUCCESS.json`` exists is skipped, so re-running a finished pipeline costs seconds and a
killed one resumes: per-image stages skip finished images, training stages resume from their last checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from wsss_ray import storage
from wsss_ray.config import DatasetConfig, PipelineConfig, config_hash
from wsss_ray.data.classes import class_names as dataset_class_names
from wsss_ray.progress import log
from wsss_ray.stage_dir import StageDir

STAGES = ("ingest", "train_cls", "pseudo_labels", "train_seg", "evaluate")


def run_stage(stage: StageDir, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if stage.is_complete():
        summary = stage.summary()
        log(stage.name, f"already complete, skipped ({stage.uri})")
        return summary
    log(stage.name, f"running → {stage.uri}")
    stage.started = time.monotonic()
    summary = stage.complete(work())
    log(stage.name, f"done in {summary['seconds']:.1f}s")
    return summary


def dataset_present(config: DatasetConfig) -> bool:
    if config.format == "voc":
        return storage.exists(storage.join(config.root, "ImageSets", "Segmentation", f"{config.train_split}.txt"))
    return storage.exists(storage.join(config.root, "annotations", f"instances_{config.train_split}.json"))


def ensure_dataset(config: DatasetConfig) -> None:
    """Generate the toy dataset at ``root`` when the config asks for it and nothing is there yet."""
    if config.generate is None or dataset_present(config):
        return
    from wsss_ray.data.toy import make_toy_dataset

    toy = config.generate
    log("dataset", f"generating the toy {config.format.upper()} dataset at {config.root}")
    kwargs = {"fmt": config.format, "num_train": toy.num_train, "num_val": toy.num_val,
              "image_size": toy.image_size, "num_classes": toy.num_classes, "max_objects": toy.max_objects,
              "seed": toy.seed}
    local = storage.local_path_or_none(config.root)
    if local is not None:
        make_toy_dataset(local, **kwargs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_toy_dataset(tmp, **kwargs)
        storage.upload_dir(tmp, config.root)


def _without_workers(section: Any) -> dict[str, Any]:
    # The worker count changes speed, not results: a run resumed on another cluster size keeps its outputs.
    return section.model_dump(mode="json", exclude={"workers"})


def _model_sha(stage: StageDir) -> str | None:
    return stage.summary().get("model_sha256") if stage.is_complete() else None


def stage_dirs(config: PipelineConfig) -> dict[str, StageDir]:
    """Stage directories keyed by their config, everything upstream, and the checkpoints they consume.

    A stage after a training stage is keyed by the trained weights' hash once that training is complete, so
    retrained weights never meet outputs made with other ones. Call again after a training stage finishes.
    """
    out = config.output
    dirs = {"ingest": StageDir.create(out, "ingest", config_hash(config.dataset.model_dump(
        mode="json", exclude={"generate"})))}
    dirs["train_cls"] = StageDir.create(out, "train_cls", config_hash(
        dirs["ingest"].key, _without_workers(config.train_cls), config.dataset.supervision))
    dirs["pseudo_labels"] = StageDir.create(out, "pseudo_labels", config_hash(
        dirs["train_cls"].key, config.pseudo_labels.generator, _model_sha(dirs["train_cls"])))
    dirs["train_seg"] = StageDir.create(out, "train_seg", config_hash(
        dirs["pseudo_labels"].key, _without_workers(config.train_seg)))
    dirs["evaluate"] = StageDir.create(out, "evaluate", config_hash(
        dirs["train_seg"].key, config.evaluate, _model_sha(dirs["train_seg"])))
    return dirs


def run_pipeline(config: PipelineConfig, until: str = "evaluate") -> dict[str, Any]:
    """Run (or resume) every stage up to ``until``; returns the summaries, writes metrics.json and the report."""
    from wsss_ray.data.manifest import build_manifest, load_manifest
    from wsss_ray.pseudo_labels.stage import generate_pseudo_labels
    from wsss_ray.ray_utils import init_ray
    from wsss_ray.training.classifier import train_classifier
    from wsss_ray.training.segmentation import train_segmentation

    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; expected one of {STAGES}")
    started = time.monotonic()
    init_ray(config.ray)
    ensure_dataset(config.dataset)
    dirs = stage_dirs(config)
    names = dataset_class_names(config.dataset.format)
    num_classes = len(names)
    ds = config.dataset
    summaries: dict[str, Any] = {}

    summaries["ingest"] = run_stage(dirs["ingest"], lambda: build_manifest(ds, dirs["ingest"]))
    train_records = load_manifest(dirs["ingest"], ds.train_split)
    val_records = load_manifest(dirs["ingest"], ds.val_split)
    if not train_records:
        raise RuntimeError(f"no usable training images in {ds.root} split {ds.train_split!r} "
                           f"(failures: {summaries['ingest']['failures_uri']})")
    if until == "ingest":
        return print_stage_summary(summaries)

    summaries["train_cls"] = run_stage(dirs["train_cls"], lambda: train_classifier(
        train_records, dirs["train_cls"], config.train_cls, num_classes, ds.supervision))
    if until == "train_cls":
        return print_stage_summary(summaries)
    dirs = stage_dirs(config)  # now keyed by the trained classifier

    summaries["pseudo_labels"] = run_stage(dirs["pseudo_labels"], lambda: generate_pseudo_labels(
        train_records, dirs["pseudo_labels"], model_uri=summaries["train_cls"]["model_uri"],
        cls_config=config.train_cls, config=config.pseudo_labels, num_classes=num_classes,
        supervision=ds.supervision, class_names=names))
    if until == "pseudo_labels":
        return print_stage_summary(summaries)

    seg_records = segmentation_records(train_records, dirs["pseudo_labels"], config)
    summaries["train_seg"] = run_stage(dirs["train_seg"], lambda: train_segmentation(
        seg_records, dirs["train_seg"], config.train_seg, num_classes, val_records))
    if until == "train_seg":
        return print_stage_summary(summaries)
    dirs = stage_dirs(config)

    have_mask = {r["image_id"] for r in seg_records}
    samples = [r for r in train_records if r["mask_uri"] and r["image_id"] in have_mask][: config.evaluate.num_samples]
    summaries["evaluate"] = run_stage(dirs["evaluate"], lambda: evaluate_and_report(
        config, dirs, summaries, val_records, samples, names))
    metrics = summaries["evaluate"]["metrics"]
    storage.write_json(storage.join(config.output, "metrics.json"), metrics)
    print_results(config, summaries, time.monotonic() - started)
    return summaries


def segmentation_records(train_records: list[dict[str, Any]], pseudo_dir: StageDir,
                         config: PipelineConfig) -> list[dict[str, Any]]:
    """Training rows of ``train_seg``: every image with a pseudo-mask, and the URI of each generator output
    (``label_uri`` is the pseudo-mask; ``retrieved_uri``, ``majority_uri``, ``dist_scribble_uri`` ... the others)
    plus the image's label set, background first (the order of MSPN's proposal bits)."""
    from wsss_ray.data.weak_labels import weak_tags
    from wsss_ray.pseudo_labels.generators import GENERATORS

    outputs = GENERATORS[config.pseudo_labels.generator.name].outputs
    have_mask = {uri.rsplit("/", 1)[-1].removesuffix(".png") for uri in storage.list_files(pseudo_dir.path("pseudo"))}
    records = []
    for r in train_records:
        if r["image_id"] not in have_mask:
            continue  # failed in the pseudo-label stage (listed in its failures)
        name = f"{r['image_id']}.png"
        row = {"image_id": r["image_id"], "image_uri": r["image_uri"], "label_uri": pseudo_dir.path("pseudo", name),
               "scribble_uri": r.get("scribble_uri"),
               "label_list": [0, *weak_tags(r, config.dataset.supervision)]}
        row.update({f"{o}_uri": pseudo_dir.path(o, name) for o in outputs if o != "pseudo"})
        records.append(row)
    return records


# How the scored outputs of the pseudo-label generators are named in tables and pictures.
PSEUDO_COLUMN_NAMES = {"cam": "thresholded CAM", "pseudo": "pseudo-mask", "single": "single seed",
                       "majority": "seed majority", "retrieved": "retrieved (Y_ret)", "box_fill": "box fill"}


def _pseudo_order(name: str) -> int:
    return list(PSEUDO_COLUMN_NAMES).index(name) if name in PSEUDO_COLUMN_NAMES else len(PSEUDO_COLUMN_NAMES)


def background_only_scores(confusion: list[list[int]], names: list[str]) -> dict[str, Any]:
    """Scores of predicting background everywhere, from the real confusion matrix's ground-truth totals."""
    from wsss_ray.evaluation.metrics import ConfusionMatrix

    mat = np.asarray(confusion, np.int64)
    baseline = ConfusionMatrix(len(names))
    baseline.mat[:, 0] = mat.sum(1)
    return baseline.to_dict(names)


def evaluate_and_report(config: PipelineConfig, dirs: dict[str, StageDir], summaries: dict[str, Any],
                        val_records: list[dict[str, Any]], samples: list[dict[str, Any]],
                        names: list[str]) -> dict[str, Any]:
    from wsss_ray.data.image_io import read_image, read_label
    from wsss_ray.evaluation.report import write_report
    from wsss_ray.evaluation.segmentation import evaluate_segmentation

    stage = dirs["evaluate"]
    result = evaluate_segmentation(
        val_records + samples, stage, model_uri=summaries["train_seg"]["model_uri"],
        model_config=config.train_seg.model, config=config.evaluate, num_classes=len(names), class_names=names,
        score_split=config.dataset.val_split, use_gpu=config.pseudo_labels.use_gpu)
    pseudo = summaries["pseudo_labels"]
    scores = {"segmentation": result["scores"]}
    scores["background_only"] = background_only_scores(result["confusion"], names)
    metrics = {
        "name": config.name,
        "val_miou": result["scores"]["miou"],
        # With evaluate.crf the headline is the CRF-post-processed prediction; this is the network's own.
        "val_miou_without_crf": result["scores_raw"]["miou"],
        "background_only_miou": scores["background_only"]["miou"],
        "pseudo_mask_miou": {k: v["miou"] for k, v in pseudo["scores"].items()},
        "per_class_iou": {
            **{f"{PSEUDO_COLUMN_NAMES.get(k, k)} (train)": pseudo["scores"][k]["per_class"]
               for k in sorted(pseudo["scores"], key=_pseudo_order)},
            "segmentation (val)": result["scores"]["per_class"],
            "background only (val)": scores["background_only"]["per_class"],
        },
        "failed_images": {"ingest": summaries["ingest"]["failed"], "pseudo_labels": pseudo["failed"],
                          "evaluate": result["failed"]},
        "failures_uri": summaries["ingest"]["failures_uri"],
        "stage_seconds": {k: v.get("seconds") for k, v in summaries.items()},
        "stage_uris": {k: v.uri for k, v in dirs.items()},
    }
    storage.write_json(stage.path("metrics.json"), metrics)

    report_samples = []
    for record in samples:
        image_id = record["image_id"]
        report_samples.append({"image_id": image_id, "image": read_image(record["image_uri"]), "columns": {
            "ground truth": read_label(record["mask_uri"]),
            **{PSEUDO_COLUMN_NAMES.get(k, k): read_label(dirs["pseudo_labels"].path(k, f"{image_id}.png"))
               for k in sorted(pseudo["scores"], key=_pseudo_order)},
            "prediction": read_label(stage.path("predictions", f"{image_id}.png")),
        }})
    failures = _failures(dirs, summaries, result)
    summary_rows = {
        "segmentation val mIoU": metrics["val_miou"],
        "background-only val mIoU": metrics["background_only_miou"],
        **{f"pseudo-mask mIoU ({k})": v for k, v in metrics["pseudo_mask_miou"].items()},
        "train images": summaries["ingest"]["per_split"].get(config.dataset.train_split, 0),
        "val images": summaries["ingest"]["per_split"].get(config.dataset.val_split, 0),
        "failed images": sum(metrics["failed_images"].values()),
        "pseudo-labelling s/image": pseudo.get("mean_seconds_per_image"),
        "pseudo-labelling images/s": pseudo.get("images_per_s"),
        **{f"{k} seconds": v for k, v in metrics["stage_seconds"].items() if v is not None},
    }
    curves = {name: {key: [e.get(key) for e in summaries[name]["history"]] for key in ("loss", "val_miou")
                     if any(e.get(key) is not None for e in summaries[name]["history"])}
              for name in ("train_cls", "train_seg")}
    report_uri = write_report(
        stage.path("report"), title=f"wsss-ray: {config.name}", summary=summary_rows,
        tables={"IoU per class": {k: v for k, v in metrics["per_class_iou"].items() if v}},
        samples=report_samples, curves=curves, failures=failures,
        notes=["Pseudo-mask scores are on the training images (the WSSS convention); segmentation on val.",
               "Pixels a pseudo-mask marks uncertain (255) count as background in its score."])
    return {"metrics": metrics, "report_uri": report_uri, "evaluated": result["images"]}


def _failures(dirs: dict[str, StageDir], summaries: dict[str, Any], result: dict[str, Any]) -> list[dict[str, str]]:
    from wsss_ray.data.manifest import load_failures

    rows = [{"image_id": f["image_id"], "file": f["file"], "reason": f["reason"]} for f in load_failures(dirs["ingest"])]
    if summaries["pseudo_labels"]["failures_uri"]:
        table = storage.read_parquet(summaries["pseudo_labels"]["failures_uri"]).to_pylist()
        rows += [{"image_id": f["image_id"], "file": "pseudo_labels", "reason": f["reason"]} for f in table]
    rows += [{"image_id": f["image_id"], "file": "evaluate", "reason": f["reason"]} for f in result["failures"]]
    return rows


def _column_order(column: str) -> int:
    """Pseudo-mask columns in generator order, then segmentation, then the background-only baseline."""
    names = [f"{name} (train)" for name in PSEUDO_COLUMN_NAMES.values()] + ["segmentation (val)",
                                                                              "background only (val)"]
    return names.index(column) if column in names else len(names)


def format_iou_table(per_class: dict[str, dict[str, float | None] | None], names: list[str]) -> str:
    """Plain-text table: one row per class that is scored anywhere, one column per scored mask set."""
    columns = {k: per_class[k] for k in sorted(per_class, key=_column_order) if per_class[k]}
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


def print_stage_summary(summaries: dict[str, Any]) -> dict[str, Any]:
    """What a run stopped with ``--until`` prints: the last stage's numbers (not its per-epoch history)."""
    name, summary = list(summaries.items())[-1]
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, (dict, list))))
    for output, scores in summary.get("scores", {}).items():
        extra = "".join(f", {k} {100 * scores[k]:.1f}" for k in ("precision", "coverage") if k in scores)
        print(f"  {output}: mIoU {100 * scores['miou']:.1f}{extra}")
    return summaries


def print_results(config: PipelineConfig, summaries: dict[str, Any], seconds: float) -> None:
    evaluate = summaries["evaluate"]
    metrics = evaluate["metrics"]
    print("\n" + format_iou_table(metrics["per_class_iou"], dataset_class_names(config.dataset.format)))
    print(f"\nsegmentation val mIoU {100 * metrics['val_miou']:.1f} "
          f"(background only: {100 * metrics['background_only_miou']:.1f}); pseudo-masks: "
          + ", ".join(f"{k} {100 * v:.1f}" for k, v in metrics["pseudo_mask_miou"].items()))
    print(f"failed images: {metrics['failed_images']} (list: {metrics['failures_uri']})")
    print(f"pipeline finished in {seconds:.0f}s")
    print(f"metrics: {storage.join(config.output, 'metrics.json')}")
    print(f"report:  {evaluate['report_uri']}")
