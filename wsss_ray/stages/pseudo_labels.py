"""Stage ``pseudo_labels``: the pseudo-label generator on Ray Data: CAMs in a model actor pool, CRF and writing as CPU tasks.

Per image it writes one PNG per generator output (``pseudo/<id>.png``, ``cam/<id>.png``; uint8, 255 = ignore)
and a stats row (seconds, labels, ignored pixels, failure reason, confusion matrices against ground truth when
there is one). Stats rows are flushed to ``stats/part-*.parquet`` as they arrive; an image counts as done once
its stats row is stored, and its PNGs are written before that, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from wsss_ray.core import storage
from wsss_ray.core.items import ItemLoop, guarded, read_rows_parts, write_rows_part
from wsss_ray.core.progress import log
from wsss_ray.core.ray_utils import cluster_cpus, model_actor_pool, plan_model_pool
from wsss_ray.core.records import ManifestRecord, TrainingRecord
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.registry import GENERATORS, SEGMENTATION_OBJECTIVES, build_classifier, build_generator
from wsss_ray.models.classifier import CamClassifier
from wsss_ray.models.weights import load_weights
from wsss_ray.pipeline_config import ClassifierTrainConfig, GeneratorConfig, PipelineConfig, PseudoLabelConfig

STATS_FLUSH_ROWS = 64
# Images per Ray Data block, i.e. per CAM-actor call and per CRF task (see ``images_per_task``).
TASKS_PER_CPU = 4
MAX_IMAGES_PER_TASK = 16


def images_per_task(num_images: int, cpus: int) -> int:
    """How many images one CRF task refines (and one CAM-actor call processes).

    Ray Data's executor notices a finished task only when all its running tasks are done or after 0.1 s (it
    waits on all of them with that timeout), so with two or more tasks running each CPU idles up to ~0.1 s
    between tasks: one ~0.4 s VOC image per task lost ~25% of each CPU (measured: 1.3x on 2 CPUs instead of
    ~1.85x; bench/pseudo_labels.py). Several images per task amortise that gap; at least ``TASKS_PER_CPU``
    tasks per CPU keep the CPUs evenly loaded to the end, the progress line moving, and the work a killed
    worker takes with it small.
    """
    return max(1, min(MAX_IMAGES_PER_TASK, num_images // (TASKS_PER_CPU * max(cpus, 1))))


def load_classifier(model_uri: str, config: ClassifierTrainConfig, num_classes: int,
                    device: str = "cpu") -> CamClassifier:
    """The trained classifier exported by the ``train_cls`` stage."""
    return load_weights(build_classifier(config, num_classes - 1), model_uri).to(device).eval()


class CamActor:
    """Ray Data actor: holds the classifier once and runs the generator's model step per image."""

    def __init__(self, model_uri: str, cls_config: ClassifierTrainConfig, generator: GeneratorConfig,
                 num_classes: int, supervision: str, use_gpu: bool) -> None:
        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_classifier(model_uri, cls_config, num_classes, self.device)
        self.generator = build_generator(generator)
        self.supervision = supervision

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        out = {**row, "labels": [], "arrays": b"", "error": None, "model_seconds": 0.0}
        result, out["error"] = guarded(lambda: self._model_step(row))
        if result is not None:
            out["labels"], out["arrays"] = result
        out["model_seconds"] = time.perf_counter() - start
        return out

    def _model_step(self, row: dict[str, Any]) -> tuple[list[int], bytes]:
        image = read_image(row["image_uri"])
        labels = weak_tags(row, self.supervision)
        arrays = self.generator.model_step(self.model, image, row, labels, self.device)
        buffer = io.BytesIO()
        # float16 halves what travels through the object store; CAMs are in [0, 1].
        np.savez(buffer, **{k: v.astype(np.float16) for k, v in arrays.items()})
        return labels, buffer.getvalue()


def refine_and_write(row: dict[str, Any], generator: GeneratorConfig, out_uri: str,
                     num_classes: int) -> dict[str, Any]:
    """CPU task: CRF (or other refinement), write the masks, score them against ground truth if present."""
    start = time.perf_counter()
    gen = build_generator(generator)
    stats: dict[str, Any] = {"image_id": row["image_id"], "error": row["error"], "labels": list(row["labels"]),
                             "seconds": 0.0, "ignored_pixels": 0}
    confusions: dict[str, list[int] | None] = {name: None for name in gen.labels}
    precision: dict[str, list[int] | None] = {name: None for name in gen.labels}
    if row["error"] is None:
        # guarded: a bad image is recorded and skipped; a storage outage fails the task (a rerun resumes)
        _, error = guarded(lambda: _refine_and_score(row, gen, out_uri, num_classes, stats, confusions, precision))
        stats["error"] = error
    stats["seconds"] = row["model_seconds"] + time.perf_counter() - start
    for name in gen.labels:
        stats[f"confusion_{name}"] = confusions[name]
        stats[f"precision_{name}"] = precision[name]
    return stats


def _refine_and_score(row: dict[str, Any], gen: Any, out_uri: str, num_classes: int, stats: dict[str, Any],
                      confusions: dict[str, list[int] | None], precision: dict[str, list[int] | None]) -> None:
    """One image's refinement, mask writes and scores (into ``stats``, ``confusions``, ``precision``)."""
    image = read_image(row["image_uri"])
    with np.load(io.BytesIO(row["arrays"])) as data:
        arrays = {k: data[k] for k in data.files}
    masks = gen.refine_step(image, arrays, row, list(row["labels"]))
    # The training input ("pseudo") is written last: its presence implies the others are complete.
    for name in sorted(masks, key=lambda n: n == "pseudo"):
        storage.write_bytes(storage.join(out_uri, name, f"{row['image_id']}.png"), encode_label_png(masks[name]))
    stats["ignored_pixels"] = int((masks["pseudo"] == 255).sum())
    if row["mask_uri"]:
        target = read_label(row["mask_uri"])
        for name in gen.labels:
            cm = ConfusionMatrix(num_classes)
            cm.update(target, masks[name])
            confusions[name] = cm.mat.ravel().tolist()
            # Precision over the pixels the mask commits to (not 255): what a method that marks unsure pixels
            # (MSPN agreement, confidence threshold) should win on.
            committed = (target != 255) & (masks[name] != 255)
            precision[name] = [int((committed & (target == masks[name])).sum()), int(committed.sum()),
                               int((target != 255).sum())]


def _stats_table(rows: list[dict[str, Any]], outputs: tuple[str, ...]) -> pa.Table:
    schema = pa.schema([("image_id", pa.string()), ("error", pa.string()), ("labels", pa.list_(pa.int32())),
                        ("seconds", pa.float64()), ("ignored_pixels", pa.int64())]
                       + [(f"{kind}_{n}", pa.list_(pa.int64())) for n in outputs for kind in ("confusion", "precision")])
    return pa.Table.from_pylist(rows, schema=schema)


def read_stats(stage: StageDir) -> list[dict[str, Any]]:
    return read_rows_parts(stage.path("stats"), "image_id")


def generate_pseudo_labels(
    records: list[ManifestRecord],
    stage: StageDir,
    *,
    model_uri: str,
    cls_config: ClassifierTrainConfig,
    config: PseudoLabelConfig,
    num_classes: int,
    supervision: str,
    class_names: list[str],
) -> dict[str, Any]:
    """Run the generator over ``records`` (manifest rows) with Ray Data; resumable, returns the summary."""
    gen = build_generator(config.generator)
    storage.write_json(stage.path("generator.json"),
                       {"generator": gen.describe(), "classifier": model_uri, "supervision": supervision})
    done = {row["image_id"] for row in read_stats(stage)}
    todo = [r for r in records if r["image_id"] not in done]
    log("pseudo_labels", f"{len(records)} images, {len(done)} already done, {len(todo)} to do → {stage.uri}")

    throughput, split = None, None
    if todo:
        plan = plan_model_pool("pseudo_labels", config.max_actors, config.use_gpu)
        cpus = cluster_cpus()
        per_task = images_per_task(len(todo), cpus)
        # CAM actors on GPUs take no CPU, so every CPU runs CRF tasks; CPU actors leave the rest to the CRF.
        crf_tasks = max(1, cpus - (0 if plan.use_gpu else plan.max_actors))
        split = {"cam_actors": plan.max_actors, "cam_on_gpu": plan.use_gpu, "crf_tasks": crf_tasks}
        if plan.use_gpu:
            log("pseudo_labels", f"{plan.reason}; CRF in up to {crf_tasks} task(s) of 1 CPU")
        ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / per_task))
        ds = ds.map(
            CamActor,
            fn_constructor_kwargs={"model_uri": model_uri, "cls_config": cls_config, "generator": config.generator,
                                   "num_classes": num_classes, "supervision": supervision,
                                   "use_gpu": plan.use_gpu},
            compute=model_actor_pool(plan),
            num_cpus=0 if plan.use_gpu else 1,
            num_gpus=1 if plan.use_gpu else 0,
        )
        ds = ds.map(refine_and_write, fn_kwargs={"generator": config.generator, "out_uri": stage.uri,
                                                 "num_classes": num_classes}, num_cpus=1,
                    compute=ray.data.TaskPoolStrategy(size=crf_tasks))
        loop = ItemLoop("pseudo_labels", len(todo))
        pending: list[dict[str, Any]] = []
        for row in loop.rows(ds.iter_rows()):
            pending.append(row)
            if len(pending) >= STATS_FLUSH_ROWS:
                _flush(stage, pending, gen.labels)
        _flush(stage, pending, gen.labels)
        loop.progress.print()
        throughput = round(loop.rate, 3)
        log("pseudo_labels", f"{throughput} images/s with {split['cam_actors']} CAM actor(s) "
                             f"({'GPU' if split['cam_on_gpu'] else 'CPU'}) and up to {split['crf_tasks']} CRF task(s)")
    return {**summarize(stage, gen.labels, num_classes, class_names, len(records)), "images_per_s": throughput,
            "split": split}


def _flush(stage: StageDir, rows: list[dict[str, Any]], labels: tuple[str, ...]) -> None:
    if rows:
        write_rows_part(stage.path("stats"), _stats_table(rows, labels))
        rows.clear()


def summarize(stage: StageDir, labels: tuple[str, ...], num_classes: int, class_names: list[str],
              total: int) -> dict[str, Any]:
    """Throughput, failures and pseudo-mask mIoU per output, from the stored stats rows."""
    rows = read_stats(stage)
    failures = [{"image_id": r["image_id"], "reason": r["error"]} for r in rows if r["error"]]
    if failures:
        storage.write_parquet(stage.path("failures.parquet"), pa.Table.from_pylist(failures))
    ok = [r for r in rows if not r["error"]]
    scores = {}
    for name in labels:
        cm = ConfusionMatrix(num_classes)
        matrices = [r[f"confusion_{name}"] for r in ok if r[f"confusion_{name}"] is not None]
        if matrices:
            cm.mat += np.asarray(matrices, dtype=np.int64).sum(0).reshape(num_classes, num_classes)
            correct, committed, valid = np.asarray([r[f"precision_{name}"] for r in ok
                                                    if r[f"precision_{name}"] is not None], np.int64).sum(0)
            scores[name] = {**cm.to_dict(class_names), "precision": float(correct / max(committed, 1)),
                            "coverage": float(committed / max(valid, 1))}
    seconds = [r["seconds"] for r in ok]
    return {
        "images": total,
        "written": len(ok),
        "failed": len(failures),
        "failures_uri": stage.path("failures.parquet") if failures else None,
        "mean_seconds_per_image": float(np.mean(seconds)) if seconds else None,
        "scores": scores,
    }


def segmentation_records(train_records: list[ManifestRecord], pseudo_dir: StageDir,
                         config: PipelineConfig) -> list[TrainingRecord]:
    """Training rows of ``train_seg``: every image with a pseudo-mask, and the URI of each generator output
    (``label_uri`` is the pseudo-mask; ``retrieved_uri``, ``majority_uri``, ``dist_scribble_uri`` ... the others)
    plus what the objective takes from the manifest record (``record_fields``: MSPN's label set)."""
    outputs = GENERATORS.implementation(config.pseudo_labels.generator.name).outputs
    objective = SEGMENTATION_OBJECTIVES.implementation(config.train_seg.loss.name)
    have_mask = {uri.rsplit("/", 1)[-1].removesuffix(".png") for uri in storage.list_files(pseudo_dir.path("pseudo"))}
    records = []
    for r in train_records:
        if r["image_id"] not in have_mask:
            continue  # failed in the pseudo-label stage (listed in its failures)
        name = f"{r['image_id']}.png"
        row: TrainingRecord = {"image_id": r["image_id"], "image_uri": r["image_uri"], "label_uri": pseudo_dir.path("pseudo", name),
               "scribble_uri": r.get("scribble_uri")}
        row.update({f"{o}_uri": pseudo_dir.path(o, name) for o in outputs if o != "pseudo"})
        row.update(objective.record_fields(r, config.dataset.supervision))  # type: ignore[typeddict-item]
        records.append(row)
    return records
