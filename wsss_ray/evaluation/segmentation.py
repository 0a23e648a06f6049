"""Stage ``evaluate``: segmentation predictions and val mIoU with Ray Data.

A model actor pool predicts every val image with multi-scale + flip inference, writes the prediction PNG and
returns the image's confusion matrix; the driver sums them, so the result is exactly the dataset-level
confusion matrix (no averaging of per-image IoUs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from wsss_ray import storage
from wsss_ray.config import EvaluateConfig, SegModelConfig
from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.data.transforms import normalize
from wsss_ray.evaluation.metrics import ConfusionMatrix
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.progress import Progress, log
from wsss_ray.pseudo_labels.crf import CrfParams, crf_inference
from wsss_ray.ray_utils import model_actor_pool, want_gpu
from wsss_ray.stage_dir import StageDir
from wsss_ray.training.common import load_weights


@torch.no_grad()
def predict_multiscale(model: torch.nn.Module, image: np.ndarray, scales: Sequence[float], flip: bool,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities (C, H, W) averaged over scales and horizontal flips."""
    h, w = image.shape[:2]
    x = normalize(torch.from_numpy(np.ascontiguousarray(image))[None].to(device))
    total = None
    for scale in scales:
        xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        probs = model(xs).softmax(1)
        probs = probs[0:1] + probs[1:2].flip(-1) if flip else probs
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0]
        total = probs if total is None else total + probs
    assert total is not None
    return (total / total.sum(0, keepdim=True)).cpu().numpy()


def crf_postprocess(image: np.ndarray, probs: np.ndarray, params: CrfParams, min_prob: float = 0.01) -> np.ndarray:
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
    """Ray Data actor: predicts, writes ``predictions/<id>.png``, scores against ground truth."""

    def __init__(self, model_uri: str, model_config: SegModelConfig, num_classes: int, config: EvaluateConfig,
                 out_uri: str, use_gpu: bool) -> None:
        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model = build_segmentation_model(model_config, num_classes)
        self.model = load_weights(model, model_uri).to(self.device).eval()
        self.config, self.out_uri, self.num_classes = config, out_uri, num_classes

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        out: dict[str, Any] = {"image_id": row["image_id"], "split": row["split"], "confusion": None,
                               "confusion_raw": None, "error": None}
        try:
            image = read_image(row["image_uri"])
            probs = predict_multiscale(self.model, image, self.config.scales, self.config.flip, self.device)
            prediction = probs.argmax(0).astype(np.uint8)
            raw = prediction
            if self.config.crf is not None:
                prediction = crf_postprocess(image, probs, CrfParams(**self.config.crf.model_dump()))
            storage.write_bytes(storage.join(self.out_uri, "predictions", f"{row['image_id']}.png"),
                                encode_label_png(prediction))
            if row["mask_uri"]:
                truth = read_label(row["mask_uri"])
                cm, cm_raw = ConfusionMatrix(self.num_classes), ConfusionMatrix(self.num_classes)
                cm.update(truth, prediction)
                cm_raw.update(truth, raw)
                out["confusion"], out["confusion_raw"] = cm.mat.ravel().tolist(), cm_raw.mat.ravel().tolist()
        except Exception as error:  # noqa: BLE001 - a bad image is reported, the evaluation goes on
            out["error"] = f"{type(error).__name__}: {error}"
        out["seconds"] = time.perf_counter() - start
        return out


def evaluate_segmentation(records: list[dict[str, Any]], stage: StageDir, *, model_uri: str,
                          model_config: SegModelConfig, config: EvaluateConfig, num_classes: int,
                          class_names: list[str], score_split: str, use_gpu: bool | str = "auto") -> dict[str, Any]:
    """Predict ``records`` and score those of ``score_split`` (other rows are predicted for the report only)."""
    log("evaluate", f"{len(records)} images → {stage.uri}")
    gpu = want_gpu(use_gpu)
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 64)))
    ds = ds.map(SegmentationPredictor,
                fn_constructor_kwargs={"model_uri": model_uri, "model_config": model_config,
                                       "num_classes": num_classes, "config": config, "out_uri": stage.uri,
                                       "use_gpu": gpu},
                compute=model_actor_pool(config.max_actors, gpu), num_cpus=0 if gpu else 1, num_gpus=int(gpu))
    cm, cm_raw, failures = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes), []
    progress = Progress("evaluate", len(records))
    for row in ds.iter_rows():
        progress.update(failed=int(row["error"] is not None))
        if row["error"]:
            failures.append({"image_id": row["image_id"], "reason": row["error"]})
        elif row["confusion"] is not None and row["split"] == score_split:
            cm.mat += np.asarray(row["confusion"], np.int64).reshape(num_classes, num_classes)
            cm_raw.mat += np.asarray(row["confusion_raw"], np.int64).reshape(num_classes, num_classes)
    # With CRF post-processing ``scores`` are the CRF's and ``scores_raw`` the network's argmax; without, equal.
    return {"images": len(records), "failed": len(failures), "failures": failures[:50],
            "scores": cm.to_dict(class_names), "confusion": cm.mat.tolist(), "crf": config.crf is not None,
            "scores_raw": cm_raw.to_dict(class_names),
            "predictions_uri": stage.path("predictions")}
