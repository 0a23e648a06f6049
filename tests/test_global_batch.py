"""The global batch (issue 14, point 8): batch_size is split over the workers, the data order and the loss
denominators do not depend on the worker count."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from wsss_ray.core.config_base import ConfigError
from wsss_ray.maths.pixel_losses import masked_mean
from wsss_ray.methods.robust.config import CrossEntropyConfig
from wsss_ray.methods.robust.losses import cross_entropy
from wsss_ray.pipeline_config import ClassifierTrainConfig, SegTrainConfig
from wsss_ray.training.ingest import epoch_plan, steps_per_epoch, worker_indices


def test_steps_per_epoch_global() -> None:
    for world in (1, 2, 5):
        assert steps_per_epoch(10582, 10, world) == (10 // world, 1058)
    with pytest.raises(ConfigError, match=r"train_seg\.batch_size: 10 is not divisible by "
                                          r"train_seg\.workers\.num_workers \(4\)"):
        steps_per_epoch(10582, 10, 4, "train_seg")
    with pytest.raises(ConfigError, match=r"train_cls\.batch_size: the global batch 16 exceeds the 6"):
        steps_per_epoch(6, 16, 2, "train_cls")


def test_config_checks_the_global_batch_for_every_worker_count() -> None:
    with pytest.raises(ValueError, match=r"train_seg\.batch_size: 10 is not divisible by "
                                         r"train_seg\.workers\.num_workers \(4\)"):
        SegTrainConfig.model_validate({"batch_size": 10, "workers": {"num_workers": 4}})
    # Elastic: every count in min_workers..num_workers must divide the batch; the bad ones are listed.
    with pytest.raises(ValueError, match=r"train_cls\.batch_size: 12 is not divisible by the elastic worker "
                                         r"counts \[5\]"):
        ClassifierTrainConfig.model_validate({"batch_size": 12, "workers": {"num_workers": 6, "min_workers": 3}})
    assert ClassifierTrainConfig.model_validate({"batch_size": 12, "workers": {"num_workers": 4,
                                                                                "min_workers": 2}})


def test_sync_bn_auto_is_on_for_several_cuda_workers_only() -> None:
    """BatchNorm over the global batch where torch can (several CUDA workers): the default for both trainers."""
    from wsss_ray.training.loop import uses_sync_bn

    assert SegTrainConfig().model.sync_bn == "auto" and ClassifierTrainConfig().sync_bn == "auto"
    assert uses_sync_bn("auto", 2, "cuda") and uses_sync_bn(True, 4, "cuda")
    assert not uses_sync_bn("auto", 1, "cuda")  # one worker: plain BN is the same thing
    assert not uses_sync_bn("auto", 2, "cpu") and not uses_sync_bn(True, 2, "cpu")  # gloo: no SyncBatchNorm
    assert not uses_sync_bn(False, 2, "cuda")


def test_image_pooling_needs_two_images_per_worker() -> None:
    """DeepLab-v3's pooled 1×1 map cannot be batch-normalised from one image: a config error, not a crash in the
    workers. DeepLab-v2 has no image pooling, and one image per worker is allowed there."""
    with pytest.raises(ValueError, match=r"train_seg\.batch_size: 2 over 2 workers \(train_seg\.workers\."
                                         r"num_workers\) gives 1 image\(s\) per worker; the image-pooling "
                                         r"BatchNorm of deeplab_v3 needs at least 2"):
        SegTrainConfig.model_validate({"batch_size": 2, "workers": {"num_workers": 2}})
    assert SegTrainConfig.model_validate({"batch_size": 4, "workers": {"num_workers": 2}})
    assert SegTrainConfig.model_validate({"batch_size": 2, "model": {"name": "deeplab_v2"},
                                          "workers": {"num_workers": 2}})


def test_global_batches_do_not_depend_on_the_worker_count() -> None:
    order, seeds = epoch_plan(23, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(23)) and len(set(seeds.tolist())) == 23
    steps = 23 // 6
    for world in (1, 2, 3, 6):
        shards = [worker_indices(order, steps, 6, rank, world).reshape(steps, 6 // world) for rank in range(world)]
        for k in range(steps):  # global batch k: rows [6k, 6k + 6) of the epoch's order, rank r its r-th slice
            assert np.concatenate([shard[k] for shard in shards]).tolist() == order[6 * k:6 * k + 6].tolist()
    assert not np.array_equal(epoch_plan(23, 3, 2)[0], order)  # another epoch, another order


class _TwoWorkers:
    """Emulates torch.distributed for two workers: all_reduce adds the other worker's value."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.other: torch.Tensor | None = None
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        assert self.other is not None
        tensor += self.other


def test_global_denominator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 0: 3 labelled pixels with CE 1.0 each (sum 3.0); worker 1: 1 labelled pixel with CE 3.0. The DDP
    mean of W·s_r/n_global is (2·3/4 + 2·3/4)/2 = 1.5 = 6/4, the loss of the 4 pixels in one process; the mean
    of per-worker means would be (1.0 + 3.0)/2 = 2.0."""
    workers = _TwoWorkers(monkeypatch)

    def logits_for(ce: list[float]) -> torch.Tensor:
        # Two classes, target 0: CE = log(1 + e^x) for logits (0, x), so x = log(e^CE − 1).
        x = torch.tensor([math.log(math.exp(c) - 1.0) for c in ce], dtype=torch.float64)
        return torch.stack([torch.zeros_like(x), x])[None, :, None, :]  # (1, 2, 1, n)

    loss = cross_entropy(CrossEntropyConfig())
    rows: list[dict[str, Any]] = [
        {"logits": logits_for([1.0, 1.0, 1.0, 1.0]), "target": torch.tensor([[[0, 0, 0, 255]]]), "other": 1.0},
        {"logits": logits_for([3.0, 1.0]), "target": torch.tensor([[[0, 255]]]), "other": 3.0},
    ]
    shares = []
    for row in rows:
        workers.other = torch.tensor(row["other"], dtype=torch.float64)  # the other worker's labelled count
        shares.append(float(loss(row["logits"], row["target"])))
    assert shares == pytest.approx([1.5, 1.5])
    assert sum(shares) / 2 == pytest.approx(6.0 / 4)
    workers.other = torch.tensor(1.0, dtype=torch.float64)
    values = torch.tensor([1.0, 1.0, 1.0, 9.0], dtype=torch.float64)
    assert float(masked_mean(values, torch.tensor([True, True, True, False]))) == pytest.approx(2 * 3.0 / 4)


def test_epoch_metrics_are_averaged_over_the_workers_in_one_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch's metrics (python floats and tensors alike) go out as one vector in key order; each comes back
    as the mean of the two workers' values."""
    from wsss_ray.training.loop import means_across_workers

    mine = {"loss": torch.tensor(2.0), "data_wait": 0.5, "images_per_s": 10.0}
    assert means_across_workers(mine, torch.device("cpu")) == {"loss": 2.0, "data_wait": 0.5, "images_per_s": 10.0}
    workers = _TwoWorkers(monkeypatch)
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: (calls.append(tensor.shape), workers.all_reduce(tensor)))
    workers.other = torch.tensor([1.5, 30.0, 4.0], dtype=torch.float64)  # data_wait, images_per_s, loss
    means = means_across_workers(mine, torch.device("cpu"))
    assert means == {"loss": 3.0, "data_wait": 1.0, "images_per_s": 20.0}
    assert list(means) == ["loss", "data_wait", "images_per_s"]  # the caller's order, whatever the vector's
    assert calls == [torch.Size([3])]


def _epoch(rank: int, world: int, port: int, out: str) -> None:
    """One epoch of DeepLab (BN in eval mode) on this rank's slices of the global batches (DDP when world > 1)."""
    import os

    from wsss_ray.core.config_base import SegModelConfig
    from wsss_ray.methods.robust.objective import CrossEntropyObjective
    from wsss_ray.models.deeplab import build_segmentation_model
    from wsss_ray.training.step import TrainStep

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_segmentation_model(SegModelConfig.model_validate(
        {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny", "output_stride": 16}, "aspp_channels": 8}), 3)
    step = TrainStep(model.eval(), CrossEntropyObjective(CrossEntropyConfig())).double()  # eval: no BN statistics
    init = {k: v.clone() for k, v in step.state_dict().items()}
    ddp = torch.nn.parallel.DistributedDataParallel(step) if world > 1 else step
    optimizer = torch.optim.SGD(step.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (8, 32, 32), generator=gen)
    # Labelled pixels differ a lot between images (and so between the workers' halves of a global batch).
    for i in range(8):
        labels[i, : 4 * i] = 255
    order, _ = epoch_plan(8, 0, 0)
    mine = worker_indices(order, 2, 4, rank, world).reshape(2, 4 // world)
    for rows in mine:
        loss, _ = ddp({"image": images[rows], "label": labels[rows]})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if rank == 0:
        torch.save({"init": init, "final": step.state_dict()}, out)
    if world > 1:
        dist.destroy_process_group()


def test_one_epoch_trains_the_same_with_one_and_two_workers(tmp_path: Path) -> None:
    """The same global batches, global loss denominators and DDP's gradient mean: W = 1 and W = 2 end with the
    same weights (BN in eval mode: per-worker BN statistics are the one thing that may differ)."""
    import socket

    import torch.multiprocessing as mp

    _epoch(0, 1, 0, str(tmp_path / "one.pt"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_epoch, args=(2, port, str(tmp_path / "two.pt")), nprocs=2, join=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert any(not torch.allclose(one["init"][k], one["final"][k], atol=1e-3) for k in one["init"])  # it trained
    for key, value in one["final"].items():
        assert torch.allclose(value, two["final"][key], atol=1e-5, rtol=0), key
