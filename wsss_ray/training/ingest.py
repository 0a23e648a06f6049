"""Ray Data ingest for training: each epoch's seeded order and crops, the global batch split over the workers,
and the batches on the device.

Every worker streams its own rows through one Ray Data pipeline (``from_items`` → ``map_batches``) that spans
the rest of the run, so the map tasks of epoch e+1 run while epoch e trains and nothing is shuffled all-to-all.
Which rows a worker sees, in which order, and each row's augmentation seed are computed up front from
``(seed, epoch)`` alone (see :func:`epoch_plan`): the run repeats exactly, a run resumed at epoch e sees epoch e's
draws, and the data order does not depend on the worker count (global batch k is the same rows for any W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from wsss_ray.core.config import ConfigError
from wsss_ray.core.inference import normalize

# Rows per map task: large enough that Ray's per-task cost (~ms) is small against the decode and crop of the
# rows (~1 ms each at 128²), small enough that the first batch is ready soon and the prefetch stays smooth.
ROWS_PER_TASK = 16
# Batches each worker keeps decoded ahead of its training step.
PREFETCH_BATCHES = 4


@dataclass(frozen=True)
class RowSource:
    """Training rows and the function that maps one row (with its ``augment_seed``) to a sample dict.

    ``sample`` runs in Ray workers (a module-level function or a closure Ray can pickle); ``task_cpus`` is what each map task
    asks of the cluster (``fit`` sets it so that every worker's pipeline can run while the trainers hold theirs).
    """

    records: list[dict[str, Any]]
    sample: Callable[..., dict[str, Any]]
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    task_cpus: float = 1.0


def check_global_batch(batch_size: int, workers: int, where: str) -> None:
    """``batch_size`` is the global batch: it must split evenly over ``workers`` (ConfigError naming the field)."""
    if batch_size % workers:
        raise ConfigError(f"{where}.batch_size: {batch_size} is not divisible by {where}.workers.num_workers "
                          f"({workers}); batch_size is the global batch, split evenly over the workers")


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int, where: str = "train") -> tuple[int, int]:
    """(per-worker batch, steps per epoch) for the global ``batch_size``: b = B / W and S = N // B (drop_last),
    the same S for every worker count."""
    check_global_batch(batch_size, num_workers, where)
    if num_rows < batch_size:
        raise ConfigError(f"{where}.batch_size: the global batch {batch_size} exceeds the {num_rows} training rows")
    return batch_size // num_workers, num_rows // batch_size


def epoch_plan(num_rows: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, augment seeds) of one epoch: a permutation of the row indices and one 63-bit seed per row index,
    both drawn from ``(seed, epoch)`` only, so every epoch has a new order and new crops and runs repeat."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_rows), rng.integers(0, 2**63 - 1, size=num_rows, dtype=np.int64)


def worker_indices(order: np.ndarray, steps: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s rows of one epoch: its slice ``[kB + r·b, kB + (r+1)·b)`` of every global batch k."""
    per_worker = batch_size // world
    batches = order[:steps * batch_size].reshape(steps, world, per_worker)
    return batches[:, rank].reshape(-1)


def augment_rng(row: dict[str, Any]) -> np.random.Generator:
    """The generator for one row's augmentation, from the ``augment_seed`` that :func:`epoch_plan` drew."""
    return np.random.default_rng(int(row["augment_seed"]))


def _sample_block(block: Any, sample: Callable[..., dict[str, Any]], fn_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map_batches: ``sample`` on every row of an Arrow block, stacked into numpy columns."""
    samples = [sample(row, **fn_kwargs) for row in block.to_pylist()]
    return {key: np.stack([s[key] for s in samples]) if isinstance(samples[0][key], np.ndarray)
            else np.array([s[key] for s in samples], dtype=object) for key in samples[0]}


def shard_stream(source: RowSource, seed: int, epochs: range, steps: int, batch_size: int, rank: int,
                 world: int) -> Iterator[dict[str, np.ndarray]]:
    """This worker's batches (of ``batch_size / world`` rows) for ``epochs``, ``steps`` per epoch, in order.

    One Ray Data execution for all the epochs: the rows of every epoch are laid out up front (their order and
    seeds from :func:`epoch_plan`) and mapped in tasks of ``ROWS_PER_TASK`` rows; ``preserve_order`` keeps the
    laid-out order (cheap with one map operator: a finished task waits at most for the tasks before it).
    """
    items: list[dict[str, Any]] = []
    for epoch in epochs:
        order, seeds = epoch_plan(len(source.records), seed, epoch)
        items += [{**source.records[i], "augment_seed": int(seeds[i])}
                  for i in worker_indices(order, steps, batch_size, rank, world)]
    if not items:
        return iter(())
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    dataset = (ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / ROWS_PER_TASK))
               .map_batches(_sample_block, batch_size=None, batch_format="pyarrow", num_cpus=source.task_cpus,
                            fn_kwargs={"sample": source.sample, "fn_kwargs": source.fn_kwargs}))
    return iter(dataset.iter_batches(batch_size=batch_size // world, batch_format="numpy", drop_last=True,
                                     prefetch_batches=PREFETCH_BATCHES))


def val_stream(source: RowSource, rank: int, world: int) -> Iterator[dict[str, Any]]:
    """Rank ``rank``'s share of the val rows (row i on rank i mod world), one row at a time (their own sizes)."""
    mine = source.records[rank::world]
    if not mine:
        return iter(())
    dataset = (ray.data.from_items(mine, override_num_blocks=math.ceil(len(mine) / ROWS_PER_TASK))
               .map(source.sample, fn_kwargs=source.fn_kwargs, num_cpus=source.task_cpus))
    return iter(dataset.iter_rows())


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    """Numeric batch columns as tensors on ``device`` (the image normalised); strings and geometry stay numpy."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "image":
            out[key] = normalize(torch.from_numpy(value).to(device))
        elif key == "geometry" or value.dtype.kind in "OUS":
            out[key] = value
        else:
            out[key] = torch.from_numpy(value).to(device)
    return out
