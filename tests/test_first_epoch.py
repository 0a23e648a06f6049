"""No first-epoch stall (issue #22): the training stream's first blocks are small, so the first step waits for
one batch's rows, not a whole block; the order of the rows is unchanged (test_training_methods checks the
stream's order, epochs and seeds end to end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsss_ray.core.config_base import DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.methods.registry import map_padding
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.train_seg import segmentation_sample
from wsss_ray.training.ingest import ROWS_PER_TASK, RowSource, WarmStart, ramp_blocks, shard_stream


@pytest.mark.parametrize(("rows", "first", "expected"), [
    (120, 8, [8, 16, 32, 64]),
    (500, 8, [8, 16, 32, 64, 128, 128, 124]),
    (5, 8, [5]),
    (40, 200, [40]),
    (300, 1, [1, 2, 4, 8, 16, 32, 64, 128, 45]),
])
def test_blocks_start_at_one_batch_and_double_up_to_the_full_block(rows: int, first: int,
                                                                   expected: list[int]) -> None:
    sizes = ramp_blocks(rows, first)
    assert sizes == expected and sum(sizes) == rows
    assert max(sizes) <= ROWS_PER_TASK


def test_no_rows_no_blocks() -> None:
    assert ramp_blocks(0, 8) == []


def segmentation_rows(tmp_path: Path, num_train: int, image_size: int, crop_size: int,
                      seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A toy VOC's train rows as train_seg streams them, and its sample function's keyword arguments."""
    make_toy_dataset(str(tmp_path / "voc"), num_train=num_train, num_val=1, image_size=image_size, num_classes=3,
                     seed=seed)
    stage = StageDir.create(str(tmp_path / "out"), "ingest", "toy")
    build_manifest(DatasetConfig(root=str(tmp_path / "voc"), train_split="train", val_split="val"), stage)
    records = [{"image_id": r["image_id"], "image_uri": r["image_uri"], "label_uri": r["mask_uri"]}
               for r in load_manifest(stage, "train")]
    augment = SegTrainConfig.model_validate({"augment": {"crop_size": crop_size}}).augment
    return records, {"augment": augment, "maps": ("label",), "num_classes": 21, "padding": map_padding()}


def test_warm_start_serves_the_same_batches_as_the_stream(ray_cluster: None, tmp_path: Path) -> None:
    """The first batches decoded in the training worker while the actors start are the stream's own batches (same
    rows, seeds, dtypes), and the stream takes over without a batch lost or repeated. A run small enough to start
    no actors (at most LOCAL_ROWS rows a worker) gets the very same batches, decoded in the worker."""
    records, kwargs = segmentation_rows(tmp_path, num_train=12, image_size=40, crop_size=32, seed=3)
    source = RowSource(records, segmentation_sample, kwargs)
    # local_rows=0: these 24 rows would otherwise be decoded in this process, with no stream at all
    warm = shard_stream(source, 0, range(2), 3, 4, 0, 1, local_rows=0)
    plain = shard_stream(source, 0, range(2), 3, 4, 0, 1, warm_start=False, local_rows=0)
    local = shard_stream(source, 0, range(2), 3, 4, 0, 1)  # 24 rows ≤ LOCAL_ROWS: no actors
    served = list(warm)
    expected = list(plain)
    assert isinstance(warm, WarmStart) and warm.local_batches >= 1  # the actors took longer than one batch
    assert not isinstance(local, WarmStart)
    decoded_here = list(local)
    assert len(served) == len(expected) == len(decoded_here) == 6
    for got, here, want in zip(served, decoded_here, expected, strict=True):
        assert sorted(got) == sorted(here) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert np.array_equal(got[key], want[key]), key
            assert here[key].dtype == want[key].dtype and np.array_equal(here[key], want[key]), key


def test_stream_runs_where_the_trainers_leave_less_than_a_cpu_free(ray_cluster: None, tmp_path: Path) -> None:
    """A training worker holding 1.75 of the cluster's 2 CPUs streams its rows through one 0.25-CPU actor (what
    ``fit`` sizes beside two 0.75-CPU trainers): nothing in the stream may need a whole CPU (Ray Data's
    ``from_arrow`` did, for its metadata tasks, and waited for ever). With no CPU free at all (``actors=0``)
    the worker decodes its rows itself: the same batches."""
    import ray

    records, kwargs = segmentation_rows(tmp_path, num_train=6, image_size=32, crop_size=24, seed=4)

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=1.75)
    def trainer(actors: int) -> list[dict[str, np.ndarray]]:
        source = RowSource(records, segmentation_sample, kwargs, task_cpus=0.25, actors=actors)
        return list(shard_stream(source, 0, range(2), 3, 2, 0, 1, warm_start=False, local_rows=0))

    # In a placement group, as Ray Train's workers: its CPUs stay reserved while the task waits on the stream
    # (a plain task blocked in ray.get lends its CPUs out), and the stream's own tasks and actors run outside it.
    group = placement_group([{"CPU": 1.75}])
    ray.get(group.ready(), timeout=60)
    in_group = trainer.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group))
    try:
        streamed = ray.get(in_group.remote(1), timeout=120)
        decoded_here = ray.get(in_group.remote(0), timeout=120)
    finally:
        remove_placement_group(group)
    assert len(streamed) == len(decoded_here) == 6
    for got, want in zip(decoded_here, streamed, strict=True):
        assert sorted(got) == sorted(want)
        assert all(np.array_equal(got[key], want[key]) for key in want)


@pytest.mark.parametrize(("cluster", "per_worker", "workers", "expected"), [
    (2, 0.5, 2, (0.5, 1)),   # the tests' tiny runs: (2 - 1) / 2 free each
    (2, 0.75, 2, (0.25, 1)),  # 0.25 free each: one smallest actor
    (2, 1.0, 2, (0.25, 0)),  # nothing free: the workers decode their own rows
    (32, 4, 4, (1.0, 4)),    # 16 CPUs free, 4 a worker: four 1-CPU actors
    (96, 2, 2, (1.0, 8)),    # 46 free a worker: capped at 8
])
def test_ingest_actors_fit_beside_the_trainers(cluster: float, per_worker: float, workers: int,
                                               expected: tuple[float, int]) -> None:
    from wsss_ray.training.loop import ingest_actors

    assert ingest_actors(cluster, per_worker, workers) == expected
