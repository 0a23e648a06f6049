"""The training step's speed options (``train_seg.speed``, ``train_cls.speed``): config fields that take effect on
CUDA only, change nothing on CPU, and are not part of a stage's key (issue #22)."""

from __future__ import annotations

import torch

from wsss_ray.core.config_base import SpeedConfig
from wsss_ray.methods.registry import SEGMENTATION_OBJECTIVES
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline import stage_dirs
from wsss_ray.pipeline_config import PipelineConfig, SegTrainConfig
from wsss_ray.training.optim import build_optimizer
from wsss_ray.training.speed import compile_step, optimizer_options, prepare_step
from wsss_ray.training.step import TrainStep

ALL_ON = SpeedConfig(compile=True, channels_last=True, optimizer_impl="fused", cudnn_benchmark=True)
CPU = torch.device("cpu")


def tiny_seg_config(speed: SpeedConfig) -> SegTrainConfig:
    return SegTrainConfig.model_validate({
        "model": {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny", "output_stride": 8}, "aspp_channels": 16},
        "optimizer": {"lr": 0.05}, "speed": speed.model_dump()})


def losses(speed: SpeedConfig, steps: int = 2) -> list[float]:
    """A few real training steps (model + objective + SGD) with ``speed`` on the CPU, from one seed."""
    config = tiny_seg_config(speed)
    torch.manual_seed(0)
    step = prepare_step(TrainStep(build_segmentation_model(config.model, 5),
                                  SEGMENTATION_OBJECTIVES.build(config.loss, 5, 0)), config.speed, CPU)
    optimizer = build_optimizer(step.parameter_groups(), config.optimizer, config.head_lr_multiplier,
                                **optimizer_options(config.speed, CPU))
    forward = compile_step(step, config.speed, CPU)
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        batch = {"image": torch.randn(2, 3, 40, 40, generator=generator),
                 "label": torch.randint(0, 5, (2, 40, 40), generator=generator)}
        loss, _ = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


def test_every_speed_option_is_ignored_on_cpu() -> None:
    benchmark = torch.backends.cudnn.benchmark
    step = prepare_step(TrainStep(torch.nn.Conv2d(3, 4, 3), torch.nn.Identity()), ALL_ON, CPU)
    assert step.model.weight.is_contiguous()  # not channels_last
    assert torch.backends.cudnn.benchmark == benchmark
    assert optimizer_options(ALL_ON, CPU) == {}
    assert compile_step(step, ALL_ON, CPU) is step


def test_cpu_training_with_every_option_on_matches_the_default_step_exactly() -> None:
    assert losses(ALL_ON) == losses(SpeedConfig())


def test_speed_options_are_config_fields_that_leave_stage_keys_alone(tmp_path: object) -> None:
    base = {"output": str(tmp_path), "dataset": {"root": str(tmp_path)}}
    plain = PipelineConfig.model_validate(base)
    fast = PipelineConfig.model_validate({**base, "train_seg": {"speed": ALL_ON.model_dump()},
                                          "train_cls": {"speed": {"compile": True}}})
    assert fast.train_seg.speed.compile and fast.train_cls.speed.compile
    assert {k: d.key for k, d in stage_dirs(plain).items()} == {k: d.key for k, d in stage_dirs(fast).items()}
