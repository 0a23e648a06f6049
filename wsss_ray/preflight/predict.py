"""Pre-flight of ``wsss-ray predict``: the model, the input images and the output folder, before Ray starts."""

from __future__ import annotations

import posixpath

from wsss_ray.core import storage
from wsss_ray.models.card import TrainedModel, resolve_model
from wsss_ray.preflight import probe
from wsss_ray.preflight.output import output_problems
from wsss_ray.preflight.problem import PreflightOptions, Problem
from wsss_ray.stages.predict import IMAGE_SUFFIXES, PredictOptions, model_sha256, output_conflict, resolve_inputs

MODEL_FIX = "give a train_seg-* stage folder (or its model.pt) with model.json beside it, local or s3://"


def _reachable(field: str, uri: str) -> list[Problem]:
    """A quick look at an S3 URI first, so a dead endpoint is reported in seconds (storage would retry)."""
    if not storage.is_s3(uri):
        return []
    try:
        probe.info(uri.split("*", 1)[0].rsplit("/", 1)[0] if "*" in uri else uri)
    except probe.Unreachable as error:
        return [Problem(field, uri, error.what, error.fix)]
    return []


def _model(uri: str) -> tuple[TrainedModel | None, list[Problem]]:
    problems = _reachable("--model", uri)
    if problems:
        return None, problems
    try:
        return resolve_model(uri), []
    except (OSError, ValueError) as error:
        what = str(error).removeprefix(f"--model {uri.rstrip('/')}: ")
        return None, [Problem("--model", uri, what, MODEL_FIX)]


def _inputs(spec: str) -> list[Problem]:
    problems = _reachable("--input", spec)
    if problems:
        return problems
    try:
        uris, _ = resolve_inputs(spec)
    except (OSError, ValueError) as error:
        return [Problem("--input", spec, str(error), "give a folder, prefix, glob or .txt list of images")]
    if uris:
        return []
    return [Problem("--input", spec, f"no images found (suffixes {', '.join(IMAGE_SUFFIXES)})",
                    "give a folder, prefix, glob or .txt list of images")]


def predict_problems(model: str, inputs: str, out: str | None, options: PredictOptions,
                     overwrite: bool = False) -> list[Problem]:
    """Every problem of a predict run, together: model, input, where the output goes, and whether ``out`` holds
    masks of another model or other options (an error unless ``overwrite``)."""
    trained, problems = _model(model)
    problems += _inputs(inputs)
    folder = model.rstrip("/")
    folder = posixpath.dirname(folder) if folder.endswith(".pt") else folder
    where = out or posixpath.dirname(folder) or "."  # the default: predict-<hash> beside the stage folder
    problems += output_problems("--out", where, PreflightOptions())
    if trained is not None and out and not problems and not overwrite:
        conflict = output_conflict(out.rstrip("/"), model_sha256(trained), options)
        if conflict:
            problems.append(Problem("--out", out, conflict, "give another --out, or --overwrite to delete its "
                                                            "masks and start clean"))
    return problems
