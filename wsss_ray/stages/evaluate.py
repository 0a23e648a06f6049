"""Stage ``evaluate``: segmentation predictions and val mIoU with Ray Data.

A model actor pool predicts every val image with multi-scale + flip inference, writes the prediction PNG and
returns the image's confusion matrix; the driver sums them, so the result is exactly the dataset-level
confusion matrix (no averaging of per-image IoUs).

The stage evaluates, nothing more: the run's metrics and HTML report are put together from every stage's results
by ``report/run.py``, called by the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from wsss_ray.core import storage
from wsss_ray.core.config_base import CrfConfig, SegModelConfig
from wsss_ray.core.items import ItemLoop, guarded
from wsss_ray.core.progress import log
from wsss_ray.core.ray_utils import model_actor_pool, plan_model_pool
from wsss_ray.core.records import ManifestRecord
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.maths.crf import crf_inference
from wsss_ray.maths.inference import multiscale_probabilities
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.weights import load_weights
from wsss_ray.pipeline_config import EvaluateConfig, PipelineConfig
from wsss_ray.stages.ingest import ground_truth_sources


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


def evaluate_segmentation(records: list[ManifestRecord], stage: StageDir, *, model_uri: str,
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


def ground_truth(config: PipelineConfig, manifest: Sequence[ManifestRecord]) -> dict[str, str | None]:
    """Which ground truth each split was scored against (train: the pseudo-masks; val: the segmentation), read
    from the ingest stage's manifest rows (``metrics.json``'s ``ground_truth``)."""
    ds = config.dataset
    sources = ground_truth_sources(list(manifest), [ds.train_split, ds.val_split], ds.format)
    val = sources.get(ds.val_split)
    if ds.format == "voc" and ds.val_ground_truth == "official" and val not in (None, "SegmentationClass"):
        # SegmentationClass missing for some val images, or a manifest built before the option existed.
        log("evaluate", f"val scored against {val}, not SegmentationClass (dataset.val_ground_truth: official)")
    return sources
