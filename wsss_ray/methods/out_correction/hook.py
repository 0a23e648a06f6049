"""OuT in the training loop: an EMA teacher that corrects the pseudo-masks from the inflection epoch on.

The maths (teacher update, the three correction strategies) is in ``methods/out_correction/correction.py``; this module
plugs it into the trainer as a :class:`~wsss_ray.training.hooks.TrainHook`, schedules it and, in *cumulative*
mode, carries each image's corrected mask from one visit to the next.

Training sees random crops, so a cumulative mask lives at full resolution in the stage's storage
(``<stage>/corrected/<image_id>.png``): at each visit the current mask is cropped with the batch's recorded
:class:`~wsss_ray.data.transforms.CropGeometry`, corrected, and the corrected crop is scattered back. Storage rather
than worker memory because Ray Data does not send an image to the same worker each epoch, and because a resumed
run must continue from the masks it had (corrections made after the last checkpoint are kept: they are the
teacher's judgement, not a half-written file — every PNG is written atomically).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core import storage
from wsss_ray.data.image_io import encode_label_png, read_label
from wsss_ray.data.transforms import CropGeometry, apply_geometry, scatter_back
from wsss_ray.methods.out_correction.config import OutCorrectorConfig
from wsss_ray.methods.out_correction.correction import EmaTeacher, correct_pseudo_masks, correction_stats
from wsss_ray.training.hooks import TrainHook

STORE = "corrected"
# The EMA teacher's weights, saved beside the model in every checkpoint.
TEACHER_FILE = "teacher.pt"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # A private oneDNN probe; a torch build without it counts as "not native".
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and probe is not None and bool(probe())


def teacher_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The teacher forward's dtype for ``OutCorrectorConfig.teacher_precision`` on ``device``."""
    if precision == "bfloat16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def _channels_last(dtype: torch.dtype, device: torch.device) -> bool:
    # oneDNN's bf16 convolutions want NHWC on CPU; CUDA and float32 keep the default layout.
    return dtype != torch.float32 and device.type == "cpu"


def build_teacher(model: nn.Module, decay: float, precision: str,
                  buffers: str = "ema") -> tuple[EmaTeacher, torch.dtype]:
    """OuT's EMA teacher of ``model`` and the dtype its forward runs in (``teacher_precision`` resolved).

    A bf16 teacher on CPU keeps its weights channels-last to match the inputs ``teacher_probabilities`` gives it.
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    dtype = teacher_dtype(precision, device)
    teacher = EmaTeacher(model, decay, buffers=buffers)
    if _channels_last(dtype, device):
        teacher.model.to(memory_format=torch.channels_last)
    return teacher, dtype


def teacher_probabilities(teacher: EmaTeacher, images: torch.Tensor, scale: float,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The teacher's class probabilities (float32) at the images' size, predicted at ``scale`` × that size.

    A teacher forward costs about a third of a training step (forward + backward ≈ 1 + 2), which is most of OuT's
    overhead. ``dtype`` bfloat16 runs it under autocast (about half the cost on hardware with native bf16);
    ``scale`` 0.5 costs a quarter, for coarser corrections near object boundaries.
    """
    size = images.shape[-2:]
    if scale != 1.0:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    if _channels_last(dtype, images.device):
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        probs = teacher.probabilities(images)
    if scale != 1.0:
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs.contiguous()


class OnlineCorrector(TrainHook):
    """EMA teacher + pseudo-mask correction for one training worker.

    As a training hook: ``before_step`` corrects the batch's pseudo-mask, ``after_step`` updates the teacher from
    the model just stepped, and the teacher is checkpointed as ``teacher.pt``.
    """

    def __init__(self, config: OutCorrectorConfig, model: nn.Module, stage_uri: str) -> None:
        self.config = config
        self.teacher, self.dtype = build_teacher(model, config.ema_decay, config.teacher_precision,
                                                 config.teacher_buffers)
        self.store = storage.join(stage_uri, STORE)

    def active(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` corrects: from epoch ``inflection_epoch`` on, i.e. once that many epochs have
        been trained on the raw pseudo-masks (OuT's "4 epoch": corrections from the 5th epoch counted from 1)."""
        return epoch >= self.config.inflection_epoch

    def reset_store(self) -> None:
        """A run starting from epoch 0 must not inherit masks corrected by an earlier, discarded run."""
        if self.config.mode == "cumulative":
            storage.delete(self.store)

    def update(self, model: nn.Module) -> None:
        self.teacher.update(model)

    def checkpoint_state(self) -> dict[str, Any]:
        return {TEACHER_FILE: self.teacher}

    def on_start(self, start_epoch: int, rank: int) -> None:
        if start_epoch == 0 and rank == 0:
            self.reset_store()

    def before_step(self, batch: dict[str, Any], epoch: int) -> dict[str, float]:
        return self.correct(batch, epoch)

    def after_step(self, model: nn.Module) -> None:
        self.update(model)

    @torch.no_grad()
    def correct(self, batch: dict[str, Any], epoch: int) -> dict[str, float]:
        """Replace ``batch["label"]`` by the corrected pseudo-mask (in place); returns correction statistics."""
        if not self.active(epoch):
            return {}
        geometries = [CropGeometry.from_array(g) for g in batch["geometry"]]
        label = batch["label"].long()
        valid = torch.from_numpy(np.stack([g.valid() for g in geometries])).to(label.device)
        cumulative = self.config.mode == "cumulative"
        current = self._carried(batch, geometries, label) if cumulative else label
        probs = teacher_probabilities(self.teacher, batch["image"], self.config.teacher_scale, self.dtype)
        corrected = correct_pseudo_masks(current, probs, valid, self.config.strategy, self.config.confidence,
                                         self.config.mask_momentum)
        if cumulative:
            self._carry_forward(batch, geometries, corrected)
        batch["label"] = corrected
        return correction_stats(label, corrected, valid)

    def _path(self, image_id: str) -> str:
        return storage.join(self.store, f"{image_id}.png")

    def _carried(self, batch: dict[str, Any], geometries: list[CropGeometry], label: torch.Tensor) -> torch.Tensor:
        """Crops of the carried masks; an image not corrected yet carries its original pseudo-mask."""
        crops = []
        for i, (image_id, geometry) in enumerate(zip(batch["image_id"], geometries, strict=True)):
            path = self._path(str(image_id))
            crops.append(torch.from_numpy(apply_geometry(read_label(path), geometry)).long()
                         if storage.exists(path) else label[i].cpu())
        return torch.stack(crops).to(label.device)

    def _carry_forward(self, batch: dict[str, Any], geometries: list[CropGeometry], corrected: torch.Tensor) -> None:
        crops = corrected.cpu().numpy().astype(np.uint8)
        for image_id, label_uri, geometry, crop in zip(batch["image_id"], batch["label_uri"], geometries, crops,
                                                       strict=True):
            path = self._path(str(image_id))
            full = read_label(path) if storage.exists(path) else read_label(str(label_uri))
            storage.write_bytes(path, encode_label_png(scatter_back(full, crop, geometry)))
