"""Stage ``predict``: a trained segmentation model over any folder, prefix, glob or list of images, on Ray Data.

The model runs in an actor pool (GPUs when the cluster has them), the optional DenseCRF as CPU tasks. Per image
it writes ``masks/<name>.png`` (VOC palette, the image's displayed size), optionally ``overlays/<name>.jpg``,
and a row (image, size, seconds, classes found, failure). Rows are flushed to ``rows/part-*.parquet`` as they
arrive and an image counts as done once its row is stored (its files are written before, atomically), so a
rerun skips finished images and retries failed ones. At the end ``predictions.parquet`` holds one row per
image and ``summary.json`` the totals.

Image sizes: the network sees each image resized so that its longer side is at most ``max_side`` and each side
at least ``min_size`` (a 1×1 image is *resized up*, not padded: padding would make the one pixel's prediction
mostly about the padding). The class probabilities are resized back to the image's own size, so every mask has
exactly the image's displayed size. The CRF runs at the network's resolution and its labels are resized back
with nearest neighbour. Images within both limits (VOC's ~500 px) are predicted exactly like ``evaluate`` does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import math
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from wsss_ray.core import storage
from wsss_ray.core.config_base import CrfConfig, config_hash
from wsss_ray.core.items import ItemLoop, guarded, read_rows_parts, write_rows_part
from wsss_ray.core.progress import log
from wsss_ray.core.ray_utils import cluster_cpus, model_actor_pool, plan_model_pool
from wsss_ray.data.image_io import decode_photo, encode_jpeg, encode_label_png
from wsss_ray.maths.inference import multiscale_probabilities
from wsss_ray.models.card import MODEL_CARD, TrainedModel, ensure_model_card, resolve_model
from wsss_ray.report.figures import overlay
from wsss_ray.stages.evaluate import crf_postprocess
from wsss_ray.stages.pseudo_labels import images_per_task

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
LIST_SUFFIXES = (".txt", ".lst")
FLUSH_ROWS = 64
FLUSH_SECONDS = 30.0
# Labels whose probability stays below this everywhere are dropped before the CRF (as crf_postprocess does).
CRF_MIN_PROB = 0.01


# ------------------------------------------------------------------------------------------------ inputs

def _has_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def resolve_inputs(spec: str) -> tuple[list[str], str]:
    """The image URIs an ``--input`` names, and the root their output names are relative to.

    ``spec`` is a folder or prefix (images below it, recursively, by suffix), a glob (``s3://b/x/*.jpg``,
    ``/data/**/*.png``), a text file of URIs (``.txt``/``.lst``: one per line, ``#`` comments, relative paths
    against the file's folder) or a single image.
    """
    if not storage.is_s3(spec):
        spec = storage.local_path_or_none(spec) or spec  # absolute, as list_files returns local paths
    if _has_glob(spec):
        head = spec.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        # fnmatch's "*" also matches "/", so "**" and "*" both reach into subfolders.
        uris = sorted(u for u in storage.list_files(head.rsplit("/", 1)[0]) if fnmatch.fnmatchcase(u, spec))
        return uris, _common_root(uris)
    if spec.lower().endswith(LIST_SUFFIXES) and storage.list_files(spec) == [spec]:
        folder = spec.rsplit("/", 1)[0]
        uris = []
        for line in storage.read_text(spec).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                uris.append(line if "://" in line or line.startswith("/") else storage.join(folder, line))
        return uris, _common_root(uris)
    files = storage.list_files(spec)
    if files == [spec]:  # a single image
        return files, _common_root(files)
    return [u for u in files if u.lower().endswith(IMAGE_SUFFIXES)], spec.rstrip("/")


def _common_root(uris: list[str]) -> str:
    if not uris:
        return ""
    prefix = posixpath.commonprefix([u.rsplit("/", 1)[0] + "/" for u in uris])
    return prefix[: prefix.rfind("/")] if "/" in prefix else ""


def output_names(uris: list[str], root: str) -> list[str]:
    """``a/b.jpg`` → ``a/b``; names that would collide (``x.jpg`` beside ``x.png``) keep their suffix (``x_png``)."""
    def stem(uri: str, keep_suffix: bool) -> str:
        rel = uri[len(root):].lstrip("/") if root and uri.startswith(root) else uri.split("://")[-1].lstrip("/")
        base, dot, suffix = rel.rpartition(".")
        if not dot or "/" in suffix:
            return rel
        return f"{base}_{suffix}" if keep_suffix else base
    plain = [stem(u, False) for u in uris]
    counts: dict[str, int] = {}
    for name in plain:
        counts[name] = counts.get(name, 0) + 1
    return [stem(u, True) if counts[n] > 1 else n for u, n in zip(uris, plain)]


# ------------------------------------------------------------------------------------------------ per image

@dataclass(frozen=True)
class PredictOptions:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: CrfConfig | None = None
    overlay: bool = False
    max_side: int = 1024
    min_size: int = 64


def working_size(height: int, width: int, max_side: int, min_size: int) -> tuple[int, int]:
    """The size the network sees: longer side ≤ ``max_side``, each side ≥ ``min_size`` (see the module doc)."""
    scale = min(1.0, max_side / max(height, width))
    return max(min_size, round(height * scale)), max(min_size, round(width * scale))


def _failure(uri: str, reason: str | None) -> str | None:
    """``guarded``'s reason, naming the file where the reason does not already (a bug's reason names a function)."""
    return reason if reason is None or uri in reason else f"{uri}: {reason}"


class PredictActor:
    """Ray Data actor: holds the model; decodes, predicts, and (without CRF) writes the outputs itself."""

    def __init__(self, model: TrainedModel, options: PredictOptions, out_uri: str, use_gpu: bool) -> None:
        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = model.build(self.device)
        self.names = list(model.card["classes"])
        self.options, self.out_uri = options, out_uri

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        out = {"image": row["image"], "name": row["name"], "height": None, "width": None, "failure": None,
               "crf_input": None, "seconds": 0.0}
        # A bad image is a failure row, never the end of the job (``guarded``).
        _, reason = guarded(lambda: self._predict(row, out))
        out["failure"] = _failure(row["image"], reason)
        out["seconds"] = time.perf_counter() - start
        return out

    def _predict(self, row: dict[str, Any], out: dict[str, Any]) -> None:
        image = decode_photo(storage.read_bytes(row["image"]), row["image"])
        h, w = image.shape[:2]
        out.update(height=h, width=w)
        wh, ww = working_size(h, w, self.options.max_side, self.options.min_size)
        work = image if (wh, ww) == (h, w) else np.asarray(Image.fromarray(image).resize((ww, wh), Image.BILINEAR))
        probs = multiscale_probabilities(self.model, work, self.options.scales, self.options.flip, self.device)
        # Labels below min_prob everywhere can win no pixel (each pixel's best is ≥ 1/C ≥ min_prob, also after
        # bilinear resizing, a convex combination) and the CRF drops them too (crf_postprocess), so only the
        # others travel or get resized: all 21 VOC probabilities of a 4000×3000 photo would be 1 GB.
        min_prob = min(CRF_MIN_PROB, 1.0 / len(probs))
        kept = np.flatnonzero(probs.reshape(len(probs), -1).max(axis=1) >= min_prob)
        if self.options.crf is not None:
            buffer = io.BytesIO()
            # float16 halves what travels through the object store to the CRF task.
            np.savez(buffer, work=work, probs=probs[kept].astype(np.float16), kept=kept)
            out["crf_input"] = buffer.getvalue()
            return
        if (wh, ww) == (h, w):
            mask = probs.argmax(0).astype(np.uint8)
        else:
            full = F.interpolate(torch.from_numpy(probs[kept])[None], size=(h, w), mode="bilinear",
                                 align_corners=False)[0]
            mask = kept[full.argmax(0).numpy()].astype(np.uint8)
        out.update(write_outputs(image, mask, row["name"], self.out_uri, self.names, self.options.overlay))


def write_outputs(image: np.ndarray, mask: np.ndarray, name: str, out_uri: str, names: list[str],
                  with_overlay: bool) -> dict[str, Any]:
    """Write the mask PNG (and overlay); the mask last, so its presence means the image's outputs are whole."""
    if with_overlay:
        storage.write_bytes(storage.join(out_uri, "overlays", f"{name}.jpg"), encode_jpeg(overlay(image, mask)))
    storage.write_bytes(storage.join(out_uri, "masks", f"{name}.png"), encode_label_png(mask))
    found = [int(c) for c in np.unique(mask)]
    return {"class_ids": found, "classes": [names[c] if c < len(names) else str(c) for c in found]}


def crf_and_write(row: dict[str, Any], crf: CrfConfig, out_uri: str, names: list[str],
                  with_overlay: bool) -> dict[str, Any]:
    """CPU task: DenseCRF at the network's resolution, labels back to the image's size, then the outputs."""
    start = time.perf_counter()
    out = {k: v for k, v in row.items() if k != "crf_input"}

    def work() -> None:
        with np.load(io.BytesIO(row["crf_input"])) as data:
            work, probs, kept = data["work"], data["probs"].astype(np.float32), data["kept"]
        # The actor dropped only labels below crf_postprocess's own min_prob, which it would drop too, so this
        # gives the labels crf_postprocess gives on all the probabilities; just less travels between tasks.
        mask = kept[crf_postprocess(work, probs, crf, CRF_MIN_PROB)].astype(np.uint8)
        h, w = int(row["height"]), int(row["width"])
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        image = decode_photo(storage.read_bytes(row["image"]), row["image"]) if with_overlay else work
        out.update(write_outputs(image, mask, row["name"], out_uri, names, with_overlay))

    if row["failure"] is None and row["crf_input"] is not None:
        out["failure"] = _failure(row["image"], guarded(work)[1])
    out["seconds"] = row["seconds"] + time.perf_counter() - start
    return out


# ------------------------------------------------------------------------------------------------ the job

ROW_SCHEMA = pa.schema([("image", pa.string()), ("name", pa.string()), ("mask", pa.string()),
                        ("height", pa.int64()), ("width", pa.int64()), ("seconds", pa.float64()),
                        ("classes", pa.list_(pa.string())), ("class_ids", pa.list_(pa.int32())),
                        ("failure", pa.string())])


def _table_row(row: dict[str, Any], out_uri: str) -> dict[str, Any]:
    ok = row["failure"] is None
    return {"image": row["image"], "name": row["name"],
            "mask": storage.join(out_uri, "masks", f"{row['name']}.png") if ok else None,
            "height": row["height"], "width": row["width"], "seconds": float(row["seconds"]),
            "classes": row.get("classes") if ok else None, "class_ids": row.get("class_ids") if ok else None,
            "failure": row["failure"]}


def read_rows(out_uri: str) -> list[dict[str, Any]]:
    """The stored rows, the latest per image (a rerun retries failures and appends their new rows)."""
    return read_rows_parts(storage.join(out_uri, "rows"), "image")


def _options_json(options: PredictOptions) -> dict[str, Any]:
    return {**asdict(options), "scales": list(options.scales),
            "crf": options.crf.model_dump() if options.crf else None}


def model_sha256(trained: TrainedModel) -> str:
    """The SHA-256 of the model's weights: what an output folder's masks are keyed by (with the options)."""
    return hashlib.sha256(storage.read_bytes(trained.weights_uri)).hexdigest()


def default_output(model: TrainedModel, inputs: str, options: PredictOptions, sha: str | None = None) -> str:
    """``predict-<hash>`` beside the model's stage folder, keyed by the weights, the input and the options."""
    folder = model.weights_uri.rsplit("/", 1)[0]
    parent = folder.rsplit("/", 1)[0]
    key = config_hash(sha or model_sha256(model), inputs, _options_json(options))
    return storage.join(parent, f"predict-{key}")


class PredictOutputConflict(ValueError):
    """``--out`` holds masks of another model or other options: resuming there would mix them."""


# What a predict run writes into its --out folder (``--overwrite`` deletes these, nothing else there).
OUTPUT_ENTRIES = ("masks", "overlays", "rows", "predictions.parquet", "summary.json", "predict.json", MODEL_CARD)


def output_conflict(out_uri: str, sha: str, options: PredictOptions) -> str | None:
    """Why the masks already in ``out_uri`` are not this model's with these options, or None (empty folder, or
    the same model and options: a rerun resumes there). ``predict.json`` records both for every run."""
    meta_uri = storage.join(out_uri, "predict.json")
    if not storage.exists(meta_uri):
        made = [e for e in ("masks", "rows") if storage.exists(storage.join(out_uri, e))]
        return f"it holds {made[0]}/ of an unknown run (no predict.json)" if made else None
    before = storage.read_json(meta_uri)
    old_sha, old_options = before.get("model_sha256"), before.get("options") or {}
    differ = []
    if old_sha != sha:
        differ.append(f"model sha256 {str(old_sha)[:12]}… → {sha[:12]}…" if old_sha else
                      "model (not recorded: made before predict keyed its folders)")
    now = _options_json(options)
    for name, value in now.items():
        old = old_options.get(name)
        if name not in old_options:
            differ.append(f"{name} (not recorded) → {_shown(value)}")
        elif old != value:
            differ.append(f"{name} parameters differ" if isinstance(old, dict) and isinstance(value, dict) else
                          f"{name} {_shown(old)} → {_shown(value)}")
    return None if not differ else "its masks come from another run: " + ", ".join(differ)


def _shown(value: Any) -> str:
    """An option's value in a message: off/on for a section that is None or set, else the value."""
    if value is None or isinstance(value, bool | dict):
        return "on" if value else "off"
    return str(value)


def clear_outputs(out_uri: str) -> None:
    """Delete what earlier predict runs wrote into ``out_uri`` (and only that)."""
    for entry in OUTPUT_ENTRIES:
        storage.delete(storage.join(out_uri, entry))


def _claim_output(out_uri: str, trained: TrainedModel, sha: str, inputs: str, options: PredictOptions,
                  overwrite: bool) -> None:
    """Make ``out_uri`` this run's: refuse (or, with ``overwrite``, clear) another run's masks there, then record
    the model and options in ``predict.json``."""
    conflict = output_conflict(out_uri, sha, options)
    if conflict and not overwrite:
        raise PredictOutputConflict(f"--out {out_uri}: {conflict}; give another --out, or --overwrite to delete "
                                    "its masks and start clean")
    if conflict:
        log("predict", f"--overwrite: deleting the earlier run's outputs in {out_uri} ({conflict})")
        clear_outputs(out_uri)
    storage.write_json(storage.join(out_uri, "predict.json"), {
        "model": trained.weights_uri, "model_sha256": sha, "input": inputs, "options": _options_json(options)})
    storage.write_json(storage.join(out_uri, MODEL_CARD), trained.card)


def predict_images(model: str, inputs: str, out: str | None = None, *, options: PredictOptions | None = None,
                   max_actors: int = 4, use_gpu: bool | str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Predict every image ``inputs`` names with the model at ``model``; returns the summary.

    A rerun into the same ``out`` resumes what the same model (by SHA-256) and options produced there; masks of
    another model or other options raise :class:`PredictOutputConflict`, unless ``overwrite``: then they are
    deleted first and the run starts clean. Ray must be initialised (``wsss_ray.ray_utils.init_ray``); the CLI
    does it.
    """
    options = options or PredictOptions()
    trained = resolve_model(model)
    sha = model_sha256(trained)
    out_uri = (out or default_output(trained, inputs, options, sha)).rstrip("/")
    uris, root = resolve_inputs(inputs)
    if not uris:
        raise FileNotFoundError(f"--input {inputs}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    _claim_output(out_uri, trained, sha, inputs, options, overwrite)
    names = output_names(uris, root)
    done = {r["image"] for r in read_rows(out_uri) if r["failure"] is None}
    todo = [{"image": u, "name": n} for u, n in zip(uris, names) if u not in done]
    log("predict", f"{len(uris)} images, {len(uris) - len(todo)} already done, {len(todo)} to do → {out_uri}")

    throughput = _predict_todo(todo, trained, options, out_uri, max_actors, use_gpu) if todo else None

    wanted = set(uris)
    rows = sorted((r for r in read_rows(out_uri) if r["image"] in wanted), key=lambda r: r["image"])
    storage.write_parquet(storage.join(out_uri, "predictions.parquet"), pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    failed = [r for r in rows if r["failure"] is not None]
    seconds = [r["seconds"] for r in rows if r["failure"] is None]
    summary = {"images": len(uris), "predicted": len(rows) - len(failed), "failed": len(failed),
               "skipped_done": len(uris) - len(todo), "images_per_s": throughput,
               "mean_seconds_per_image": float(np.mean(seconds)) if seconds else None,
               "failures": [r["failure"] for r in failed[:50]], "out": out_uri,
               "table": storage.join(out_uri, "predictions.parquet")}
    storage.write_json(storage.join(out_uri, "summary.json"), summary)
    log("predict", f"done: {summary['predicted']} predicted, {summary['failed']} failed, "
                   f"{summary['skipped_done']} skipped (already done), {throughput} images/s → {summary['table']}")
    return summary


def _predict_todo(todo: list[dict[str, Any]], trained: TrainedModel, options: PredictOptions, out_uri: str,
                  max_actors: int, use_gpu: bool | str) -> float:
    """Predict the images of ``todo`` (``image``, ``name``) into ``out_uri`` on an actor pool (CRF as CPU tasks
    after it), appending their table rows as they come; returns the images/s."""
    plan = plan_model_pool("predict", max_actors, use_gpu, setting="wsss-ray predict --gpu")  # type: ignore[arg-type]
    if plan.use_gpu:
        log("predict", plan.reason)
    gpu = plan.use_gpu
    per_task = images_per_task(len(todo), cluster_cpus())
    ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / per_task))
    ds = ds.map(PredictActor, fn_constructor_kwargs={"model": trained, "options": options, "out_uri": out_uri,
                                                     "use_gpu": gpu},
                compute=model_actor_pool(plan), num_cpus=0 if gpu else 1, num_gpus=int(gpu))
    if options.crf is not None:
        ds = ds.map(crf_and_write, fn_kwargs={"crf": options.crf, "out_uri": out_uri,
                                              "names": list(trained.card["classes"]),
                                              "with_overlay": options.overlay}, num_cpus=1)
    loop = ItemLoop("predict", len(todo))
    pending: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    for row in loop.rows(ds.iter_rows(), error_key="failure"):
        pending.append(_table_row(row, out_uri))
        if len(pending) >= FLUSH_ROWS or time.monotonic() - last_flush > FLUSH_SECONDS:
            _flush(out_uri, pending)
            last_flush = time.monotonic()
    _flush(out_uri, pending)
    return round(loop.rate, 3)


def _flush(out_uri: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        write_rows_part(storage.join(out_uri, "rows"), pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
        rows.clear()


__all__ = ["PredictOptions", "PredictOutputConflict", "TrainedModel", "ensure_model_card", "output_names", "predict_images", "resolve_inputs",
           "resolve_model"]
