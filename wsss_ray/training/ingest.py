"""Ray Data ingest for training: the per-epoch reshuffled, reseeded rows, batch sizes, batches on the device."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import ray
import torch

from wsss_ray.core.inference import normalize

# Blocks of the training rows: enough map tasks in flight for any cluster, and independent of its size.
TRAIN_BLOCKS = 200


def epoch_seeded_dataset(records: list[dict[str, Any]], seed: int, sample: Any,
                         fn_kwargs: dict[str, Any]) -> ray.data.Dataset:
    """Training rows in a new order every epoch, each mapped by ``sample`` with its own augmentation seed.

    Ray Data executes a dataset afresh for every epoch, and ``reseed_after_execution`` mixes that execution's
    index into the shuffle's seed and into each row's ``augment_seed`` (read by :func:`augment_rng`). So every
    epoch sees a new order and new crops, as with torchvision's ``RandomSampler``, and two runs with the same
    ``seed`` see the same ones: a sweep's trials and a rerun of one config differ only by their hyperparameters.
    That needs the rows to reach the workers in order, which ``fit`` asks of the ingest (:func:`ordered_ingest`).
    A run resumed from a checkpoint (or after a worker failure) starts again from epoch 0's draws, because the
    restarted split coordinator counts executions from 0.
    """
    from ray.data.expressions import random as random_column

    reseeded = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    # The shuffle and the per-row seeds depend on the block layout; Ray's automatic block count follows the
    # cluster's CPUs (and a trial's placement group), so fix it to repeat on any cluster.
    return (ray.data.from_items(records, override_num_blocks=max(1, min(len(records), TRAIN_BLOCKS)))
            .random_shuffle(seed=reseeded)
            .with_column("augment_seed", random_column(seed=seed, reseed_after_execution=True))
            .map(sample, fn_kwargs=fn_kwargs))


def augment_rng(row: dict[str, Any]) -> np.random.Generator:
    """The generator for one row's augmentation, seeded by the ``augment_seed`` column (a float in [0, 1) with
    53 random bits) that :func:`epoch_seeded_dataset` adds."""
    return np.random.default_rng(int(row["augment_seed"] * 2**53))


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options with ``preserve_order``: the training rows reach the workers in the seeded
    order of ``epoch_seeded_dataset`` (else in whichever order the map tasks finish), so runs repeat."""
    # A copy of the driver's options, as DataConfig.default_ingest_options would give (without its deprecated
    # exclude_resources argument, which warns in every trial).
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int) -> tuple[int, int]:
    """(per-worker batch size, steps per epoch) with ``drop_last``; the batch shrinks for tiny datasets."""
    per_worker = max(1, num_rows // num_workers)
    batch = min(batch_size, per_worker)
    return batch, max(1, per_worker // batch)


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
