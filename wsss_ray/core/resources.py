"""How many workers a training group or a model actor pool gets, and whether on GPUs: one pure rule per kind.

Ray places a group of workers that each ask for a GPU only when the cluster has that many GPUs; with fewer and
no autoscaler to add nodes, the request waits forever, with no message (measured: a ``TorchTrainer`` with
``ScalingConfig(num_workers=2, use_gpu=True)`` on a one-GPU cluster printed nothing for 100 s). So the sizing is
decided here, before anything is submitted, from what the cluster has:

- ``use_gpu: false``: the requested count on CPUs.
- ``use_gpu: auto``: GPUs when the cluster has any (or an autoscaler may add them), as many GPU workers as the
  cluster can place up to the requested count (a training group: the largest count that also divides the global
  batch, so every count trains on the same batches); no GPUs: the requested count on CPUs.
- ``use_gpu: true``: the requested count on GPUs; fewer GPUs than that and no autoscaler is a
  :class:`~wsss_ray.core.config_base.ConfigError` naming the config field and the GPUs seen.

These functions take plain values (no Ray calls), so the pre-flight checks and the stages share them and tests
can drive every case; :func:`wsss_ray.core.ray_utils.cluster_gpus` and ``cluster_autoscales`` give the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from wsss_ray.core.config_base import ConfigError

UseGpu = bool | Literal["auto"]


class UnplaceableError(ConfigError):
    """A group or pool the cluster can never place: ``setting`` (the config field or CLI option), ``what`` is
    wrong and ``fix`` (what to change), so the pre-flight step can report it in its two-line form."""

    def __init__(self, setting: str, what: str, fix: str) -> None:
        super().__init__(f"{setting}: {what}. {fix}")
        self.setting, self.what, self.fix = setting, what, fix


@dataclass(frozen=True)
class WorkerPlan:
    """A training group's size: ``num_workers`` (``min_workers``: elastic lower bound, or None), one GPU each
    when ``use_gpu``, and ``reason``: one line saying what was chosen and why (the stage logs it)."""

    num_workers: int
    use_gpu: bool
    reason: str
    min_workers: int | None = None


@dataclass(frozen=True)
class PoolPlan:
    """A model actor pool's size: up to ``max_actors`` actors, one GPU each when ``use_gpu``; ``reason`` as above."""

    max_actors: int
    use_gpu: bool
    reason: str


def _gpus_seen(cluster_gpus: float) -> str:
    count = math.floor(cluster_gpus)
    return f"the cluster has {count} GPU{'' if count == 1 else 's'}"


def plan_workers(field: str, requested: int, use_gpu: UseGpu, cluster_gpus: float, autoscaling: bool,
                 batch_size: int | None = None, min_workers: int | None = None) -> WorkerPlan:
    """The worker group of a training stage (``field``: its ``workers`` section, e.g. ``"train_cls.workers"``).

    ``requested`` is ``num_workers``; ``batch_size`` the global batch (a smaller group keeps it: the largest
    count at most the GPUs that divides it); ``min_workers`` an elastic group's lower bound, which Ray Train
    itself sizes between the bounds, so only the upper bound is capped (and the lower one with it).
    """
    gpus = math.floor(cluster_gpus)
    if use_gpu is False or (use_gpu == "auto" and gpus == 0 and not autoscaling):
        why = f"{field}.use_gpu: false" if use_gpu is False else f"{field}.use_gpu: auto and {_gpus_seen(gpus)}"
        return WorkerPlan(requested, False, f"{requested} CPU worker(s) ({why})", min_workers)
    if gpus >= requested or autoscaling:
        note = "" if gpus >= requested else f" ({_gpus_seen(gpus)} now; the autoscaler adds GPU nodes)"
        return WorkerPlan(requested, True, f"{requested} GPU worker(s){note}", min_workers)
    if use_gpu is True:
        raise UnplaceableError(
            f"{field}.use_gpu", f"true asks for {requested} GPU worker(s) ({field}.num_workers: {requested}, one GPU "
            f"each) but {_gpus_seen(gpus)} and no autoscaler (ray.autoscaling: false): the group could never be "
            f"placed", f"Set {field}.num_workers to at most {gpus}, or {field}.use_gpu: auto to use the GPUs there are")
    counts = [w for w in range(gpus, 0, -1) if batch_size is None or batch_size % w == 0]
    chosen = counts[0]
    batch = "" if batch_size is None else f"; the global batch {batch_size} stays, {batch_size // chosen} per worker"
    low = None if min_workers is None else min(min_workers, chosen)
    return WorkerPlan(chosen, True, f"{chosen} GPU worker(s) of the {requested} in {field}.num_workers: "
                                    f"{_gpus_seen(gpus)} and no autoscaler{batch}", low)


def plan_actor_pool(field: str, max_actors: int, use_gpu: UseGpu, cluster_gpus: float, cluster_cpus: float,
                    autoscaling: bool, setting: str | None = None) -> PoolPlan:
    """A model actor pool (pseudo-label CAMs, evaluate, predict; ``field``: its config section, e.g.
    ``"pseudo_labels"``; ``setting``: how errors name the GPU switch, ``<field>.use_gpu`` unless given, e.g. the
    CLI's ``--gpu``): GPU actors as for :func:`plan_workers` (``use_gpu: true`` needs at least one GPU, or an
    autoscaler); CPU pools leave one CPU free, or a 2-CPU cluster starves the read tasks and the stage hangs
    (ray-notes)."""
    gpus = math.floor(cluster_gpus)
    switch = setting or f"{field}.use_gpu"
    if use_gpu is False or (use_gpu == "auto" and gpus == 0 and not autoscaling):
        size = max(1, min(max_actors, math.floor(cluster_cpus) - 1))
        why = f"{switch}: false" if use_gpu is False else f"{switch}: auto and {_gpus_seen(gpus)}"
        return PoolPlan(size, False, f"up to {size} CPU actor(s) ({why})")
    if gpus == 0 and not autoscaling:
        raise UnplaceableError(switch, f"true needs a GPU but {_gpus_seen(gpus)} and no autoscaler "
                               f"(ray.autoscaling: false): the actors could never start",
                               f"Set {switch}: auto" if setting is None else f"Use {switch} auto")
    size = max_actors if autoscaling and gpus < max_actors else max(1, min(max_actors, gpus))
    return PoolPlan(size, True, f"up to {size} GPU actor(s) ({_gpus_seen(gpus)}, {field} max_actors {max_actors})")
