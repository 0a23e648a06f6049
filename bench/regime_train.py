"""One training run of ``bench/robust_regime.py``: the project's segmenter, objective and training hooks (built
from a ``SegTrainConfig`` exactly as the ``train_seg`` stage builds them) in a plain PyTorch loop on in-memory
tensors, with the memorisation probe after every epoch. No Ray: the loop is ``train_one_epoch``'s step order
(lr, hooks' ``before_step``, forward, backward, ``after_backward``, ``optimizer.step()``, ``after_step``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss_ray.maths.inference import normalize
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.registry import build_segmentation_objective, build_training_hooks, segmentation_row_fields
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline_config import SegTrainConfig
from wsss_ray.training.optim import build_optimizer, set_lr
from wsss_ray.training.step import TrainStep

IGNORE = 255
NUM_CLASSES = 21


@dataclass
class RegimeData:
    """The training set in memory: normalised images (N, 3, H, W), the clean and noisy masks (N, H, W; int64),
    the objective's maps by name (N, H, W) and per-image fields (N, ...); the val images and clean masks."""

    images: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor
    maps: dict[str, torch.Tensor]
    fields: dict[str, torch.Tensor]
    val_images: torch.Tensor
    val_masks: torch.Tensor
    num_classes: int
    image_ids: list[str] = field(default_factory=list)


def _batch(data: RegimeData, index: torch.Tensor, flips: torch.Tensor, map_names: tuple[str, ...],
           device: torch.device) -> dict[str, Any]:
    """The images and maps of ``index``, each mirrored where ``flips``; the crop geometry OuT's corrector reads
    (the whole image: no scale, no crop)."""
    h, w = data.images.shape[-2:]

    def take(tensor: torch.Tensor) -> torch.Tensor:
        picked = tensor[index].clone()
        picked[flips] = picked[flips].flip(-1)
        return picked.to(device)

    batch: dict[str, Any] = {"image": take(data.images), **{k: take(data.maps[k]) for k in map_names},
                             **{k: v[index].to(device) for k, v in data.fields.items()}}
    batch["geometry"] = np.stack([np.array([h, w, 0, 0, max(h, w), int(f)], np.int32) for f in flips.tolist()])
    batch["image_id"] = [data.image_ids[i] for i in index.tolist()] if data.image_ids else [str(i) for i in index]
    return batch


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 32) -> torch.Tensor:
    model.eval()
    out = [model(images[i:i + chunk].to(device)).argmax(1).cpu() for i in range(0, len(images), chunk)]
    model.train()
    return torch.cat(out)


def memorisation(prediction: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor) -> dict[str, float]:
    """On the noisy training pixels (noisy label ≠ clean label, both labelled): the share predicted as their noisy
    label (memorised) and as their clean label (right); on the clean pixels, the share predicted right."""
    labelled = (clean != IGNORE) & (noisy != IGNORE)
    wrong, right = labelled & (noisy != clean), labelled & (noisy == clean)
    n_wrong, n_right = max(int(wrong.sum()), 1), max(int(right.sum()), 1)
    return {"memorised": float((wrong & (prediction == noisy)).sum()) / n_wrong,
            "noisy_right": float((wrong & (prediction == clean)).sum()) / n_wrong,
            "clean_right": float((right & (prediction == clean)).sum()) / n_right}


def _val_miou(prediction: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    cm.update(masks.numpy(), prediction.numpy())
    return float(cm.miou())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(config: SegTrainConfig, data: RegimeData, device: torch.device, work: str) -> dict[str, Any]:
    """Train ``config`` on ``data``; per epoch: the memorisation figures on the full training images and the val
    mIoU against the clean val masks. ``work``: the stage folder OuT's corrector may write to."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    build_model = partial(build_segmentation_model, config.model, data.num_classes)
    model = build_model().to(device)
    step = TrainStep(model, build_segmentation_objective(config, data.num_classes, build_model)).to(device)
    optimizer = build_optimizer(step.parameter_groups(), config.optimizer, config.head_lr_multiplier)
    hooks = build_training_hooks(config, model, work)
    for hook in hooks:
        hook.on_start(0, 0)
    map_names = tuple(data.maps)
    n, batch_size = len(data.images), config.batch_size
    steps = n // batch_size
    epochs: list[dict[str, float]] = []
    _sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch in range(config.epochs):
        step.set_epoch(epoch)
        order = torch.randperm(n, generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        losses = []
        for i in range(steps):
            set_lr(optimizer, config.optimizer, epoch * steps + i, config.epochs * steps, steps)
            index = order[i * batch_size:(i + 1) * batch_size]
            batch = _batch(data, index, flips[index], map_names, device)
            for hook in hooks:
                hook.before_step(batch, epoch)
            loss, _ = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for hook in hooks:
                hook.after_backward(step)
            optimizer.step()
            for hook in hooks:
                hook.after_step(model)
            losses.append(loss.detach())
        train_prediction = _predict(model, data.images, device)
        figures = memorisation(train_prediction, data.clean, data.noisy)
        figures["val_miou"] = _val_miou(_predict(model, data.val_images, device), data.val_masks, data.num_classes)
        figures["loss"] = float(torch.stack(losses).mean())
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

    maps = {"label": t(arrays[label_key]), "clean": t(arrays["clean"])}
    maps.update({k: t(arrays[k]) for k in ("retrieved", "majority", "agreement", "proposed")})
    row_fields = segmentation_row_fields(config.loss)
    fields: dict[str, torch.Tensor] = {}
    if row_fields is not None:
        per_image = [row_fields({"label_list": labels}, NUM_CLASSES) for labels in arrays["label_lists"]]
        fields = {k: torch.from_numpy(np.stack([p[k] for p in per_image])) for k in per_image[0]}
    return RegimeData(images=normalize(torch.from_numpy(arrays["image"])), clean=t(arrays["clean"]),
                      noisy=t(arrays["label"]), maps=maps, fields=fields,
                      val_images=normalize(torch.from_numpy(arrays["val_image"])), val_masks=t(arrays["val_mask"]),
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
