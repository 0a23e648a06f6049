"""Pre-flight check of the backbones' ImageNet weights: given and of the backbone's shape, or declined.

A paper-size backbone (ResNet-50/101) trained from scratch on VOC reaches a fraction of the papers' numbers, and
nothing in a run would say why; so such a config must either name weights or say ``weights: none``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch

from wsss_ray.core.config_base import BackboneConfig
from wsss_ray.models.resnet import NO_WEIGHTS, ResNet, backbone_state
from wsss_ray.pipeline_config import PipelineConfig
from wsss_ray.preflight import probe
from wsss_ray.preflight.problem import REPRODUCE_DOC, PreflightOptions, Problem

# Backbones the papers start from ImageNet weights, by name: their names in words.
PAPER_BACKBONES = {"resnet50": "ResNet-50", "resnet101": "ResNet-101"}


def weights_variable(name: str) -> str:
    """The environment variable the shipped configs (jobs/configs/voc.yaml, coco.yaml) read the weights from."""
    return f"{name.upper()}_WEIGHTS"


def _backbones(config: PipelineConfig) -> Iterator[tuple[str, BackboneConfig]]:
    yield "train_cls.backbone", config.train_cls.backbone
    yield "train_seg.model.backbone", config.train_seg.model.backbone


def check_backbone_weights(config: PipelineConfig, options: PreflightOptions) -> list[Problem]:
    """Each backbone's ``weights``: readable, a state dict of that backbone, or ``none`` (from scratch)."""
    problems = []
    for section, backbone in _backbones(config):
        field, uri = f"{section}.weights", (backbone.weights or "").strip()
        words = PAPER_BACKBONES.get(backbone.name, backbone.name)
        fix = (f"set {weights_variable(backbone.name)} (read by jobs/configs) or {field} to a torchvision {words} "
               f"ImageNet state dict, local or s3://; see {REPRODUCE_DOC}")
        if uri.lower() == NO_WEIGHTS or (not uri and backbone.name not in PAPER_BACKBONES):
            continue
        if not uri:
            problems.append(Problem(field, "(not set)", f"{words} would train from scratch", fix.replace(
                "; see", ", or set it to `none` to train from scratch on purpose; see")))
            continue
        if options.skip_remote(uri, field):
            continue
        what = _weights_problem(uri, backbone)
        if what is not None:
            problems.append(Problem(field, uri, what, fix))
    return problems


def _weights_problem(uri: str, backbone: BackboneConfig) -> str | None:
    """What is wrong with the weights at ``uri`` for ``backbone``, or None."""
    try:
        data = probe.read_bytes(uri)
    except FileNotFoundError:
        return "no such file"
    except probe.Unreachable as error:
        return error.what
    except OSError as error:
        return f"cannot read: {error}"
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch's reasons (pickle, zip, weights_only) all mean the same here
        return "torch.load cannot read it as tensors (not a file written by torch.save?)"
    try:
        state = backbone_state(raw, uri)
    except ValueError as error:
        return str(error).removeprefix(f"{uri}: ")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ResNet(backbone.name, backbone.output_stride).state_dict().items()}
    words = PAPER_BACKBONES.get(backbone.name, backbone.name)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(keys)} {label} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
             for keys, label in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
             if keys]
    return f"not a {words} state dict: {len(expected)} tensors expected; " + ", ".join(parts)
