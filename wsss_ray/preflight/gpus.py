"""Pre-flight check of the GPUs a config asks for against what the cluster has, by the same sizing rule the
stages use (:mod:`wsss_ray.core.resources`): a ``use_gpu: true`` group or pool that could never be placed is
reported before anything starts, instead of waiting forever for GPUs that are not there.

Before Ray starts, "the cluster" is known only for a local run: this machine's GPUs (``CUDA_VISIBLE_DEVICES``
respected, as Ray's own detection does). A run that joins a cluster (``ray.address`` or ``RAY_ADDRESS``) is sized
by the stages when they join it, with the same rule and the same message, before any work is submitted.
"""

from __future__ import annotations

import os

from wsss_ray.core.ray_utils import AUTOSCALING_VAR, cluster_address
from wsss_ray.core.resources import UnplaceableError, plan_actor_pool, plan_workers
from wsss_ray.pipeline_config import PipelineConfig
from wsss_ray.preflight.problem import PreflightOptions, Problem


def local_gpus() -> int:
    """This machine's CUDA GPUs, as a local Ray cluster would see them (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(config: PipelineConfig, options: PreflightOptions) -> list[Problem]:
    """Every training group and model actor pool of ``config`` against this machine's GPUs (local runs only)."""
    if cluster_address(config.ray):
        return []
    gpus = local_gpus()
    autoscaling = (config.ray.autoscaling if config.ray.autoscaling is not None
                   else os.environ.get(AUTOSCALING_VAR, "0") == "1")
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    problems: list[Problem] = []
    for stage in ("train_cls", "train_seg"):
        section = getattr(config, stage)
        workers = section.workers
        try:
            plan_workers(f"{stage}.workers", workers.num_workers, workers.use_gpu, gpus, autoscaling,
                         batch_size=section.batch_size, min_workers=workers.min_workers)
        except UnplaceableError as error:
            problems.append(Problem(error.setting, "this machine", error.what, error.fix))
    for stage in ("pseudo_labels", "evaluate"):
        section = getattr(config, stage)
        problems += pool_problems(stage, section.max_actors, section.use_gpu, gpus, cpus, autoscaling)
    return problems


def pool_problems(field: str, max_actors: int, use_gpu: bool | str, gpus: int, cpus: int, autoscaling: bool,
                  setting: str | None = None) -> list[Problem]:
    """A model actor pool that could never start on this machine (``setting``: how to name the GPU switch)."""
    try:
        plan_actor_pool(field, max_actors, use_gpu, gpus, cpus, autoscaling, setting)  # type: ignore[arg-type]
    except UnplaceableError as error:
        return [Problem(error.setting, "this machine", error.what, error.fix)]
    return []


def predict_gpu_problems(max_actors: int, use_gpu: bool | str) -> list[Problem]:
    """``wsss-ray predict --gpu yes`` on a local run without GPUs (a joined cluster is sized when joined)."""
    if os.environ.get("RAY_ADDRESS"):
        return []
    return pool_problems("predict", max_actors, use_gpu, local_gpus(), os.cpu_count() or 1,
                         os.environ.get(AUTOSCALING_VAR, "0") == "1", setting="wsss-ray predict --gpu")
