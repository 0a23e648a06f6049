"""One training run of ``bench/robust_regime.py``: the project's segmenter, objective and training hooks (built
from a ``SegTrainConfig`` exactly as the ``train_seg`` stage builds them) in a plain PyTorch loop on in-memory
tensors, with the memorisation probe after every epoch. No Ray cluster: each epoch is the stage's own
``train_one_epoch`` (lr, hooks' ``before_step``, forward under the stage's autocast, backward, ``after_backward``,
``optimizer.step()``, ``after_step``) over batches drawn here from the tensors in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from regime_report import memorisation

from wsss_ray.data.transforms import CropGeometry
from wsss_ray.maths.inference import normalize
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.registry import (
    build_segmentation_objective,
    build_training_hooks,
    segmentation_maps,
    segmentation_row_fields,
)
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.training.ingest import RowSource
from wsss_ray.training.loop import TrainSpec, WorkerRun, train_one_epoch
from wsss_ray.training.optim import build_optimizer
from wsss_ray.training.step import TrainStep

NUM_CLASSES = 21


@dataclass
class RegimeData:
    """The training set in memory: the images as read (N, H, W, 3; normalised per batch, as the stage does), the
    clean and noisy masks (N, H, W; int64), the maps the objective reads by name (N, H, W) and per-image fields
    (N, ...); the val images and clean masks."""

    images: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor
    maps: dict[str, torch.Tensor]
    fields: dict[str, torch.Tensor]
    val_images: torch.Tensor
    val_masks: torch.Tensor
    num_classes: int


def _batch(data: RegimeData, index: torch.Tensor, flips: torch.Tensor) -> dict[str, np.ndarray]:
    """The images and maps of ``index``, each mirrored where ``flips``, as a Ray Data batch of the stage holds
    them; the crop geometry OuT's corrector reads (the whole image: no scale, no crop)."""
    h, w = data.images.shape[1:3]

    def take(tensor: torch.Tensor, width_dim: int = -1) -> np.ndarray:
        picked = tensor[index]  # advanced indexing: a copy
        picked[flips] = picked[flips].flip(width_dim)
        return picked.numpy()

    # Images are N×H×W×3 as read (normalised per batch, as the stage does): their width is the last but one axis.
    batch = {"image": take(data.images, -2), **{k: take(v) for k, v in data.maps.items()},
             **{k: v[index].numpy() for k, v in data.fields.items()}}
    batch["geometry"] = np.stack([CropGeometry(h, w, 0, 0, max(h, w), f).as_array() for f in flips.tolist()])
    batch["image_id"] = np.array([str(i) for i in index.tolist()])
    return batch


def _batches(data: RegimeData, batch_size: int, epochs: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Every epoch's batches in order: a fresh permutation and flips per epoch, the last partial batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    n = len(data.images)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        for i in range(n // batch_size):
            index = order[i * batch_size:(i + 1) * batch_size]
            yield _batch(data, index, flips[index])


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 32) -> torch.Tensor:
    model.eval()
    out = [model(normalize(images[i:i + chunk].to(device))).argmax(1).cpu() for i in range(0, len(images), chunk)]
    model.train()
    return torch.cat(out)


def _val_miou(prediction: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    cm.update(masks.numpy(), prediction.numpy())
    return float(cm.miou())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_rows(**_: Any) -> dict[str, Any]:
    raise AssertionError("the bench's batches come from memory, not from training rows")


def train_run(config: SegTrainConfig, data: RegimeData, device: torch.device, work: str) -> dict[str, Any]:
    """Train ``config`` on ``data``; per epoch: the memorisation figures on the full training images and the val
    mIoU against the clean val masks. ``work``: the stage folder OuT's corrector may write to."""
    torch.manual_seed(config.seed)
    build_model = partial(build_segmentation_model, config.model, data.num_classes)
    model = build_model().to(device)
    step = TrainStep(model, build_segmentation_objective(config, data.num_classes, build_model)).to(device)
    hooks = build_training_hooks(config, model, work)
    for hook in hooks:
        hook.on_start(0, 0)
    spec = TrainSpec(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                     optimizer=config.optimizer, head_lr_multiplier=config.head_lr_multiplier,
                     build_model=build_model, build_objective=lambda: step.objective,
                     train=RowSource(records=[], sample=_no_rows))
    steps = len(data.images) // config.batch_size
    run = WorkerRun(spec=spec, step=step, ddp_step=step, forward=step,
                    optimizer=build_optimizer(step.parameter_groups(), config.optimizer, config.head_lr_multiplier),
                    hooks=hooks, shard=_batches(data, config.batch_size, config.epochs, config.seed), device=device,
                    world=1, batch_size=config.batch_size, steps=steps)
    epochs: list[dict[str, float]] = []
    _sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch in range(config.epochs):
        step.set_epoch(epoch)
        loss = train_one_epoch(run, epoch)["loss"]
        figures = memorisation(_predict(model, data.images, device), data.clean, data.noisy)
        figures["val_miou"] = _val_miou(_predict(model, data.val_images, device), data.val_masks, data.num_classes)
        figures["loss"] = loss
        epochs.append(figures)
    _sync(device)
    # Wall seconds (what a GPU run is held to) and this process's CPU seconds (what a loaded machine does not
    # inflate: a CPU run's cost).
    return {"epochs": epochs, "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started, "steps": steps * config.epochs}


def regime_data(arrays: dict[str, Any], label_key: str, config: SegTrainConfig) -> RegimeData:
    """The tensors one row trains on: ``label`` is the row's map (noisy, clean or the seed majority)."""
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).long()

    # Only the maps the objective reads (as the stage loads them): ``label`` is the row's map.
    maps = {k: t(arrays[label_key if k == "label" else k]) for k in segmentation_maps(config.loss)}
    row_fields = segmentation_row_fields(config.loss)
    fields: dict[str, torch.Tensor] = {}
    if row_fields is not None:
        per_image = [row_fields({"label_list": labels}, NUM_CLASSES) for labels in arrays["label_lists"]]
        fields = {k: torch.from_numpy(np.stack([p[k] for p in per_image])) for k in per_image[0]}
    return RegimeData(images=torch.from_numpy(arrays["image"]), clean=t(arrays["clean"]),
                      noisy=t(arrays["label"]), maps=maps, fields=fields,
                      val_images=torch.from_numpy(arrays["val_image"]), val_masks=t(arrays["val_mask"]),
                      num_classes=NUM_CLASSES)


def run_spec(payload: tuple[dict[str, Any], dict[str, Any], dict[str, Any], str, int, str]) -> dict[str, Any]:
    """One (row, seed) run from picklable inputs (a pool process calls it): the row spec, its train_seg config
    dict, the bench's arrays, the device, torch threads and the stage folder."""
    spec, config_dict, arrays, device, threads, work = payload
    torch.set_num_threads(threads)
    config = SegTrainConfig.model_validate(config_dict)
    Path(work).mkdir(parents=True, exist_ok=True)
    result = train_run(config, regime_data(arrays, spec["label_key"], config), torch.device(device), work)
    return {**{k: spec[k] for k in ("row", "group", "baseline")}, "seed": config.seed, **result}
