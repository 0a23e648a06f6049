"""The config machinery every section uses, and the sections shared across stages and methods.

A config is one YAML file describing a whole experiment (``wsss_ray.config`` composes it). Sections are frozen
pydantic models: unknown keys and wrong types are errors that name the file and the dotted field path, e.g.
``demo.yaml: train_seg.loss.label_smoothing: Input should be less than 1, got 1.5``. Defaults follow the papers;
each default says where it comes from (``docs/methods.md`` lists the choices we made where a paper is silent).

Methods are components chosen by a ``name`` field (a loss, a classifier head, a pseudo-label generator): each
method family defines its component configs in ``wsss_ray/methods/<family>/config.py`` and
``wsss_ray.methods.registry`` joins them into the unions of the stage sections (:func:`component_union`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Scales = Annotated[list[PositiveFloat], Field(min_length=1)]


class ConfigError(ValueError):
    """A config file could not be read or validated; the message names the file and field."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _name_or(default: str) -> Any:
    """A union discriminator reading ``name``, with ``default`` when the section omits it.

    Configs written before a component had alternatives omit ``name`` (``loss: {label_smoothing: 0.2}``); a plain
    ``Field(discriminator="name")`` would reject them.
    """

    def discriminate(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", None)

    return Discriminator(discriminate)


# Every component name; pydantic puts the chosen one into an error's location, which ``format_errors`` drops.
COMPONENT_TAGS: set[str] = set()


def component_union(models: list[type[BaseModel]], default: str) -> Any:
    """The discriminated union of component configs (each with a ``name`` literal), ``default`` when omitted; a
    kind with one component is just that component's config."""
    if len(models) == 1:
        COMPONENT_TAGS.add(models[0].model_fields["name"].default)
        return models[0]
    union: Any = None
    for model in models:
        tag = model.model_fields["name"].default
        COMPONENT_TAGS.add(tag)
        tagged = Annotated[model, Tag(tag)]
        union = tagged if union is None else union | tagged
    return Annotated[union, Field(discriminator=_name_or(default))]


# --------------------------------------------------------------------------------------------- dataset


class ToyDatasetConfig(StrictModel):
    """Parameters of the generated dataset (``wsss-ray make-toy-dataset``)."""

    num_train: PositiveInt = 64
    num_val: PositiveInt = 16
    image_size: Annotated[int, Field(ge=32, le=1024)] = 128
    num_classes: Annotated[int, Field(ge=1, le=20)] = 4
    max_objects: PositiveInt = 3
    seed: int = 0


class DatasetConfig(StrictModel):
    """Where the images and weak labels are, in which layout, and which supervision to use."""

    format: Literal["voc", "coco"] = "voc"
    root: str
    # VOC: the 10,582-image augmented train set is the papers' standard; COCO: train2014 / val2014.
    train_split: str = "train_aug"
    val_split: str = "val"
    supervision: Literal["tags", "boxes", "scribbles"] = "tags"
    # Use only the first N images of each split (quick runs on a real dataset); None = all.
    max_images: PositiveInt | None = None
    # When set and ``root`` holds no dataset yet, the toy dataset is generated there first.
    generate: ToyDatasetConfig | None = None


# --------------------------------------------------------------------------------------------- runtime


class RayConfig(StrictModel):
    """How to reach Ray. ``address=None`` joins the cluster in RAY_ADDRESS, or starts a local one."""

    address: str | None = None
    num_cpus: PositiveInt | None = None
    # A local cluster's dashboard (http://127.0.0.1:8265): progress of every stage, and Ray's state API,
    # which Ray Train's placement-group cleaner polls.
    include_dashboard: bool = True


class BackboneConfig(StrictModel):
    """A dilated ResNet whose parameter names match torchvision's, so ImageNet checkpoints load."""

    name: Literal["resnet_tiny", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    output_stride: Literal[8, 16, 32] = 16
    # URI of a torchvision/timm ResNet state dict (local or s3://); None trains from scratch.
    weights: str | None = None


class WorkersConfig(StrictModel):
    """Ray Train scaling: DDP over ``num_workers`` processes (gloo on CPU, NCCL when GPUs are used)."""

    num_workers: PositiveInt = 2
    # Elastic training: with min_workers set, Ray Train starts with as many workers as the cluster can hold
    # between min_workers and num_workers and resizes the group (from the latest checkpoint) as nodes come and go.
    min_workers: PositiveInt | None = None
    use_gpu: bool | Literal["auto"] = "auto"
    # Fractional CPUs leave room for Ray Data's read tasks on small (2-CPU) machines.
    cpus_per_worker: PositiveFloat = 1.0
    # Restarts of the worker group from the latest checkpoint before the stage fails.
    max_failures: Annotated[int, Field(ge=-1)] = 2

    @model_validator(mode="after")
    def _elastic_range(self) -> WorkersConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed num_workers ({self.num_workers})")
        return self

    def check_global_batch(self, batch_size: int, where: str) -> None:
        """``batch_size`` is the global batch, split evenly over the workers: it must divide by every worker
        count the group can have (each of min_workers..num_workers when elastic)."""
        low = self.num_workers if self.min_workers is None else self.min_workers
        bad = [w for w in range(low, self.num_workers + 1) if batch_size % w]
        if bad:
            counts = f"{where}.workers.num_workers ({bad[0]})" if self.min_workers is None else \
                f"the elastic worker counts {bad} of {where}.workers (min_workers..num_workers)"
            raise ConfigError(f"{where}.batch_size: {batch_size} is not divisible by {counts}; batch_size is the "
                              "global batch, split evenly over the workers")


class OptimizerConfig(StrictModel):
    """SGD with a poly schedule (OuT: lr 1e-3, momentum 0.9, wd 5e-4, power 0.9), or warm-up then cosine
    (CDSP: 10 warm-up epochs of 50)."""

    lr: PositiveFloat = 1e-3
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    schedule: Literal["poly", "warmup_cosine"] = "poly"
    poly_power: Annotated[float, Field(ge=0.0)] = 0.9
    # Linear warm-up from 0 over this many epochs (``warmup_cosine`` only), then cosine decay to 0.
    warmup_epochs: Annotated[int, Field(ge=0)] = 0


class AugmentConfig(StrictModel):
    """Random scale, crop and horizontal flip (torchvision segmentation reference and the papers)."""

    crop_size: Annotated[int, Field(ge=16)] = 448
    scale_min: PositiveFloat = 0.5
    scale_max: PositiveFloat = 1.5
    flip: bool = True

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self



class CrfConfig(StrictModel):
    """DenseCRF parameters (Krähenbühl & Koltun; the papers: gaussian 3/3, bilateral ~50-80/13/10, 10 iter)."""

    iterations: PositiveInt = 10
    gaussian_sxy: PositiveFloat = 3.0
    gaussian_compat: Annotated[float, Field(ge=0.0)] = 3.0
    bilateral_sxy: PositiveFloat = 50.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: Annotated[float, Field(ge=0.0)] = 10.0



class SegModelConfig(StrictModel):
    """DeepLab-v2 (ASPP 6/12/18/24), v3 (ASPP + image pooling) or v3+ (v3 + decoder) on a dilated ResNet."""

    name: Literal["deeplab_v2", "deeplab_v3", "deeplab_v3plus"] = "deeplab_v3"
    backbone: BackboneConfig = BackboneConfig(output_stride=16)
    aspp_channels: PositiveInt = 256
    # Synchronised BatchNorm across DDP workers (small per-GPU batches); ignored with one worker.
    sync_bn: bool = False



def format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"] if part not in COMPONENT_TAGS) or "<root>"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        if err["type"] == "union_tag_invalid":  # an unknown component name: point at the name field
            field += ".name"
            message = f"unknown {err['ctx']['tag']!r}; expected one of {err['ctx']['expected_tags']}"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f", got {json.dumps(got, default=str)}"
        lines.append(f"{source}: {field}: {message}{shown}")
    return "\n".join(lines)



def config_hash(*parts: Any) -> str:
    """A short, stable hash of config sections (and upstream hashes) used to key a stage's outputs."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
