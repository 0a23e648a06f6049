"""Stage ``evaluate``: segmentation predictions and val mIoU with Ray Data.

A model actor pool predicts every val image with multi-scale + flip inference, writes the prediction PNG and
returns the image's confusion matrix; the driver sums them, so the result is exactly the dataset-level
confusion matrix (no averaging of per-image IoUs).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from wsss_ray.core import storage
from wsss_ray.core.config_base import CrfConfig, SegModelConfig
from wsss_ray.core.items import ItemLoop, guarded
from wsss_ray.core.progress import log
from wsss_ray.core.ray_utils import model_actor_pool, plan_model_pool
from wsss_ray.core.results import EvaluationResult, FinishedStages, PseudoLabelResult
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.maths.crf import crf_inference
from wsss_ray.maths.inference import multiscale_probabilities
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.registry import GENERATORS
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.weights import load_weights
from wsss_ray.pipeline_config import EvaluateConfig, PipelineConfig
from wsss_ray.report.html import write_report
from wsss_ray.stages.ingest import ground_truth_sources, load_failures, load_manifest


def crf_postprocess(image: np.ndarray, probs: np.ndarray, params: CrfConfig, min_prob: float = 0.01) -> np.ndarray:
    """DenseCRF over the network's probabilities → label map (H, W) uint8 (the papers' optional post-processing).

    Only labels whose probability reaches ``min_prob`` somewhere take part: the CRF's cost grows with the label
    count (0.46 s with 21 labels vs 0.25 s with 3 on a VOC image) and a label below 1% everywhere cannot win a
    pixel the CRF would give it. Every label that is the argmax of some pixel is kept (its probability ≥ 1/C).
    """
    labels = np.flatnonzero(probs.reshape(len(probs), -1).max(axis=1) >= min_prob)
    if len(labels) == 1:
        return np.full(image.shape[:2], labels[0], np.uint8)
    kept = probs[labels]
    posterior = crf_inference(image, kept / kept.sum(0, keepdims=True), params)
    return labels[posterior.argmax(0)].astype(np.uint8)


class SegmentationPredictor:
    """Ray Data actor: predicts, writes ``predictions/<id>.png`` (the scored split) or ``samples/<id>.png`` (the
    report's training images, kept apart), scores against ground truth."""

    def __init__(self, model_uri: str, model_config: SegModelConfig, num_classes: int, config: EvaluateConfig,
                 out_uri: str, use_gpu: bool, score_split: str | None = None) -> None:
        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model = build_segmentation_model(model_config, num_classes)
        self.model = load_weights(model, model_uri).to(self.device).eval()
        self.config, self.out_uri, self.num_classes = config, out_uri, num_classes
        self.score_split = score_split

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        out: dict[str, Any] = {"image_id": row["image_id"], "split": row["split"], "confusion": None,
                               "confusion_raw": None}
        scores, out["error"] = guarded(lambda: self._predict(row))
        if scores is not None:
            out["confusion"], out["confusion_raw"] = scores
        out["seconds"] = time.perf_counter() - start
        return out

    def _predict(self, row: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        """Write the prediction; its confusion matrices (CRF'd or not, and the network's own) if there is
        ground truth."""
        image = read_image(row["image_uri"])
        probs = multiscale_probabilities(self.model, image, self.config.scales, self.config.flip, self.device)
        raw = probs.argmax(0).astype(np.uint8)
        prediction = raw if self.config.crf is None else crf_postprocess(image, probs, self.config.crf)
        folder = "predictions" if self.score_split in (None, row["split"]) else "samples"
        storage.write_bytes(storage.join(self.out_uri, folder, f"{row['image_id']}.png"),
                            encode_label_png(prediction))
        if not row["mask_uri"]:
            return None
        truth = read_label(row["mask_uri"])
        cm, cm_raw = ConfusionMatrix(self.num_classes), ConfusionMatrix(self.num_classes)
        cm.update(truth, prediction)
        cm_raw.update(truth, raw)
        return cm.mat.ravel().tolist(), cm_raw.mat.ravel().tolist()


def evaluate_segmentation(records: list[dict[str, Any]], stage: StageDir, *, model_uri: str,
                          model_config: SegModelConfig, config: EvaluateConfig, num_classes: int,
                          class_names: list[str], score_split: str, use_gpu: bool | str = "auto") -> dict[str, Any]:
    """Predict ``records`` and score those of ``score_split`` → ``predictions/``; other rows are predicted for the
    report only → ``samples/``."""
    log("evaluate", f"{len(records)} images → {stage.uri}")
    plan = plan_model_pool("evaluate", config.max_actors, use_gpu)  # type: ignore[arg-type]
    if plan.use_gpu:
        log("evaluate", plan.reason)
    gpu = plan.use_gpu
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 64)))
    ds = ds.map(SegmentationPredictor,
                fn_constructor_kwargs={"model_uri": model_uri, "model_config": model_config,
                                       "num_classes": num_classes, "config": config, "out_uri": stage.uri,
                                       "use_gpu": gpu, "score_split": score_split},
                compute=model_actor_pool(plan), num_cpus=0 if gpu else 1, num_gpus=int(gpu))
    cm, cm_raw = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    loop = ItemLoop("evaluate", len(records))
    for row in loop.rows(ds.iter_rows()):
        if not row["error"] and row["confusion"] is not None and row["split"] == score_split:
            cm.mat += np.asarray(row["confusion"], np.int64).reshape(num_classes, num_classes)
            cm_raw.mat += np.asarray(row["confusion_raw"], np.int64).reshape(num_classes, num_classes)
    # With CRF post-processing ``scores`` are the CRF's and ``scores_raw`` the network's argmax; without, equal.
    return {"images": len(records), "failed": len(loop.failures), "failures": loop.failures[:50],
            "scores": cm.to_dict(class_names), "confusion": cm.mat.tolist(), "crf": config.crf is not None,
            "scores_raw": cm_raw.to_dict(class_names),
            "predictions_uri": stage.path("predictions"), "samples_uri": stage.path("samples")}


def background_only_scores(confusion: list[list[int]], names: list[str]) -> dict[str, Any]:
    """Scores of predicting background everywhere, from the real confusion matrix's ground-truth totals."""
    mat = np.asarray(confusion, np.int64)
    baseline = ConfusionMatrix(len(names))
    baseline.mat[:, 0] = mat.sum(1)
    return baseline.to_dict(names)


def evaluate_and_report(config: PipelineConfig, dirs: dict[str, StageDir], summaries: dict[str, Any],
                        val_records: list[dict[str, Any]], samples: list[dict[str, Any]],
                        names: list[str]) -> dict[str, Any]:
    """The stage's entry: score val (and predict the report's train ``samples``), write ``metrics.json`` and the
    HTML report; ``summaries`` are the earlier stages', read once into typed records (``core/results.py``)."""
    stage, done = dirs["evaluate"], FinishedStages.from_summaries(summaries)
    summary = evaluate_segmentation(
        val_records + samples, stage, model_uri=done.train_seg.model_uri,
        model_config=config.train_seg.model, config=config.evaluate, num_classes=len(names), class_names=names,
        score_split=config.dataset.val_split, use_gpu=config.evaluate.use_gpu)
    result = EvaluationResult.from_summary(summary)
    titles = _scored_titles(config, done.pseudo_labels)
    metrics = run_metrics(config, dirs, done, result, names, titles)
    metrics["ground_truth"] = _ground_truth(config, dirs["ingest"])
    storage.write_json(stage.path("metrics.json"), metrics)
    report_uri = _write_report(config, dirs, done, result, metrics, samples, titles, names)
    return {"metrics": metrics, "report_uri": report_uri, "evaluated": result.images}


def _ground_truth(config: PipelineConfig, ingest: StageDir) -> dict[str, str | None]:
    """Which ground truth each split was scored against (train: the pseudo-masks; val: the segmentation)."""
    ds = config.dataset
    sources = ground_truth_sources(load_manifest(ingest), [ds.train_split, ds.val_split], ds.format)
    val = sources.get(ds.val_split)
    if ds.format == "voc" and ds.val_ground_truth == "official" and val not in (None, "SegmentationClass"):
        # SegmentationClass missing for some val images, or a manifest built before the option existed.
        log("evaluate", f"val scored against {val}, not SegmentationClass (dataset.val_ground_truth: official)")
    return sources


def _scored_titles(config: PipelineConfig, pseudo: PseudoLabelResult) -> dict[str, str]:
    """The scored pseudo-label outputs → their display names, in the generator's display order."""
    titles = GENERATORS.implementation(config.pseudo_labels.generator.name).titles
    return {k: v for k, v in titles.items() if k in pseudo.scores}


def run_metrics(config: PipelineConfig, dirs: dict[str, StageDir], done: FinishedStages,
                result: EvaluationResult, names: list[str], titles: dict[str, str]) -> dict[str, Any]:
    """What ``metrics.json`` holds: the headline mIoUs, per-class IoU of every scored mask set, failures, times."""
    pseudo = done.pseudo_labels
    background = background_only_scores(result.confusion, names)
    return {
        "name": config.name,
        "val_miou": result.scores["miou"],
        # With evaluate.crf the headline is the CRF-post-processed prediction; this is the network's own.
        "val_miou_without_crf": result.scores_raw["miou"],
        "background_only_miou": background["miou"],
        "pseudo_mask_miou": {k: v["miou"] for k, v in pseudo.scores.items()},
        "per_class_iou": {
            **{f"{title} (train)": pseudo.scores[k]["per_class"] for k, title in titles.items()},
            "segmentation (val)": result.scores["per_class"],
            "background only (val)": background["per_class"],
        },
        "failed_images": {"ingest": done.ingest.failed, "pseudo_labels": pseudo.failed, "evaluate": result.failed},
        "failures_uri": done.ingest.failures_uri,
        "stage_seconds": done.seconds(),
        "stage_uris": {k: v.uri for k, v in dirs.items()},
    }


def _write_report(config: PipelineConfig, dirs: dict[str, StageDir], done: FinishedStages,
                  result: EvaluationResult, metrics: dict[str, Any], samples: list[dict[str, Any]],
                  titles: dict[str, str], names: list[str]) -> str:
    stage, pseudo = dirs["evaluate"], done.pseudo_labels
    report_samples = []
    for record in samples:
        image_id = record["image_id"]
        report_samples.append({"image_id": image_id, "image": read_image(record["image_uri"]), "columns": {
            "ground truth": read_label(record["mask_uri"]),
            **{title: read_label(dirs["pseudo_labels"].path(k, f"{image_id}.png")) for k, title in titles.items()},
            "prediction": read_label(stage.path("samples", f"{image_id}.png")),
        }})
    summary_rows = {
        "segmentation val mIoU": metrics["val_miou"],
        "background-only val mIoU": metrics["background_only_miou"],
        **{f"pseudo-mask mIoU ({k})": v for k, v in metrics["pseudo_mask_miou"].items()},
        "train images": done.ingest.per_split.get(config.dataset.train_split, 0),
        "val images": done.ingest.per_split.get(config.dataset.val_split, 0),
        "failed images": sum(metrics["failed_images"].values()),
        "pseudo-labelling s/image": pseudo.mean_seconds_per_image,
        "pseudo-labelling images/s": pseudo.images_per_s,
        **{f"{k} seconds": v for k, v in metrics["stage_seconds"].items() if v is not None},
    }
    curves = {name: {key: [e.get(key) for e in trained.history] for key in ("loss", "val_miou")
                     if any(e.get(key) is not None for e in trained.history)}
              for name, trained in (("train_cls", done.train_cls), ("train_seg", done.train_seg))}
    return write_report(
        stage.path("report"), title=f"wsss-ray: {config.name}", summary=summary_rows,
        tables={"IoU per class": {k: v for k, v in metrics["per_class_iou"].items() if v}},
        samples=report_samples, curves=curves, failures=_failures(dirs, done, result), class_names=names,
        notes=["Pseudo-mask scores are on the training images (the WSSS convention); segmentation on val.",
               "Ground truth: " + ", ".join(f"{split} → {source}" for split, source in
                                            metrics["ground_truth"].items() if source) + " (255 = void, ignored).",
               "Pixels a pseudo-mask marks uncertain (255) count as background in its score."])


def _failures(dirs: dict[str, StageDir], done: FinishedStages, result: EvaluationResult) -> list[dict[str, str]]:
    rows = [{"image_id": f["image_id"], "file": f["file"], "reason": f["reason"]}
            for f in load_failures(dirs["ingest"])]
    if done.pseudo_labels.failures_uri:
        table = storage.read_parquet(done.pseudo_labels.failures_uri).to_pylist()
        rows += [{"image_id": f["image_id"], "file": "pseudo_labels", "reason": f["reason"]} for f in table]
    rows += [{"image_id": f["image_id"], "file": "evaluate", "reason": f["reason"]} for f in result.failures]
    return rows
