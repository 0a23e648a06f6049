"""Typed, validated pipeline configuration.

A config is one YAML file describing a whole experiment: the dataset, where results go, and one section per
pipeline stage. It is validated into frozen pydantic models: unknown keys and wrong types are errors that name
the file and the dotted field path, e.g. ``demo.yaml: train_seg.loss.label_smoothing: Input should be less than
1, got 1.5``. Defaults follow the papers (see ``../shared/methods.md``); each default says where it comes from.

Methods are components chosen by a ``name`` field (a loss, a classifier head, a pseudo-label generator); later
methods add a model to the matching union below and register their implementation next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class ConfigError(ValueError):
    """A config file could not be read or validated; the message names the file and field."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    use_gpu: bool | Literal["auto"] = "auto"
    # Fractional CPUs leave room for Ray Data's read tasks on small (2-CPU) machines.
    cpus_per_worker: PositiveFloat = 1.0
    # Restarts of the worker group from the latest checkpoint before the stage fails.
    max_failures: Annotated[int, Field(ge=-1)] = 2


class OptimizerConfig(StrictModel):
    """SGD with a poly schedule (OuT: lr 1e-3, momentum 0.9, wd 5e-4, power 0.9)."""

    lr: PositiveFloat = 1e-3
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    poly_power: Annotated[float, Field(ge=0.0)] = 0.9


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


# --------------------------------------------------------------------------------------------- classifier


class GapHeadConfig(StrictModel):
    """Global average pooling over CAM features, the CAM baseline (Zhou et al. 2016)."""

    name: Literal["gap"] = "gap"


class MultiLabelSoftMarginConfig(StrictModel):
    """The multi-label soft-margin loss every paper trains its classifier with."""

    name: Literal["multilabel_soft_margin"] = "multilabel_soft_margin"


class ClassifierTrainConfig(StrictModel):
    """Stage ``train_cls``: the classifier whose CAMs seed the pseudo-masks."""

    backbone: BackboneConfig = BackboneConfig()
    head: GapHeadConfig = GapHeadConfig()
    loss: MultiLabelSoftMarginConfig = MultiLabelSoftMarginConfig()
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 16
    # IRN/PSA-style classifier training: lr 0.01 with a 10x head multiplier, wd 1e-4.
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.01, weight_decay=1e-4)
    head_lr_multiplier: PositiveFloat = 10.0
    augment: AugmentConfig = AugmentConfig(crop_size=512)
    workers: WorkersConfig = WorkersConfig()
    seed: int = 0


# --------------------------------------------------------------------------------------------- pseudo-labels


class CrfConfig(StrictModel):
    """DenseCRF parameters (Krähenbühl & Koltun; the papers: gaussian 3/3, bilateral ~50-80/13/10, 10 iter)."""

    iterations: PositiveInt = 10
    gaussian_sxy: PositiveFloat = 3.0
    gaussian_compat: Annotated[float, Field(ge=0.0)] = 3.0
    bilateral_sxy: PositiveFloat = 50.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: Annotated[float, Field(ge=0.0)] = 10.0


class ImageCamGeneratorConfig(StrictModel):
    """Image-level CAM pseudo-masks: multi-scale + flip CAMs, background by threshold, DenseCRF."""

    name: Literal["image_cam"] = "image_cam"
    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 0.5, 1.5, 2.0]
    flip: bool = True
    # Constant background score against the max-normalised CAMs (IRN evaluates CAMs at 0.15-0.16).
    bg_score: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    # Pixels whose CRF posterior is below this become 255 (ignored by training); 0 keeps every pixel.
    confidence: Fraction = 0.0
    crf: CrfConfig = CrfConfig()


# MSPN's six (dropout rate, input scale) seeds, chosen in the paper from a larger grid.
_MSPN_SEEDS: list[tuple[float, float]] = [(0.05, 1.0), (0.05, 1.2), (0.10, 1.0), (0.10, 1.2), (0.20, 1.0), (0.30, 1.2)]


class MultiSeedGeneratorConfig(StrictModel):
    """MSPN multi-seed pseudo-masks: one classifier, CAMs under several (feature dropout, input scale) seeds, each
    refined by DenseCRF; pixels where at least ``agreement`` seeds vote for the same label are clean."""

    name: Literal["multi_seed"] = "multi_seed"
    # (dropout rate on the backbone features, input scale) per seed; default: the paper's six seeds.
    seeds: Annotated[list[tuple[Fraction, PositiveFloat]], Field(min_length=1)] = _MSPN_SEEDS
    # t: a label is clean when at least t seeds agree (paper: t in 3..6, best near 6; we default to 4, the middle
    # of the range, so a one-seed disagreement still counts as clean).
    agreement: PositiveInt = 4
    # Each seed's CAM is averaged with its mirror image (the CAM convention of every paper).
    flip: bool = True
    # Constant background score against the max-normalised CAMs, as for ``image_cam`` (IRN: 0.15).
    bg_score: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    # Per-seed CRF posterior below this becomes 255 (an abstaining vote); 0 keeps every pixel.
    confidence: Fraction = 0.0
    crf: CrfConfig = CrfConfig()

    @field_validator("agreement")
    @classmethod
    def _agreement_within_seeds(cls, value: int, info: ValidationInfo) -> int:
        seeds = info.data.get("seeds")
        if seeds is not None and value > len(seeds):
            raise ValueError(f"agreement ({value}) must not exceed the number of seeds ({len(seeds)})")
        return value


class BoxGeneratorConfig(StrictModel):
    """BANA box pseudo-masks: CAMs inside the boxes, background attention (BAP) outside, DenseCRF → ``Y_crf``;
    feature prototypes of ``Y_crf`` retrieve a second label map ``Y_ret``."""

    name: Literal["box"] = "box"
    # Grid size N of the background queries: BANA trains with N = 4 and generates pseudo labels with N = 1.
    grid: PositiveInt = 1
    # Background attention at or above this is confident background (u_0 = 1); BANA: 0.99 for generation.
    bg_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.99
    # CAM scales and flip for u_c (the papers' multi-scale + flip inference; BANA does not say, IRN's set).
    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 0.5, 1.5, 2.0]
    flip: bool = True
    crf: CrfConfig = CrfConfig()


class ScribbleGeneratorConfig(StrictModel):
    """CDSP scribble pseudo-masks: CRF-refined CAM mask of the scribbles' classes, scribble pixels on top, plus
    the distance maps of its distance entropy loss (to the scribbles and to the pseudo-label boundaries)."""

    name: Literal["scribble"] = "scribble"
    # The paper writes λs = e², λc = e⁷: the distance is scaled by sqrt(e^λ) = e^(λ/2) with λs = 2, λc = 7
    # (ResNet-101 + v3+; its ablation grid-searched λs = 1, λc = 6).
    lambda_s: float = 2.0
    lambda_c: float = 7.0
    # CAM settings for the pseudo-label, as ``image_cam`` (CDSP thresholds CAMs; IRN's scales and bg score).
    bg_score: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 0.5, 1.5, 2.0]
    flip: bool = True
    # CRF posterior below this becomes 255 (scribble pixels are never ignored); 0 keeps every pixel.
    confidence: Fraction = 0.0
    crf: CrfConfig = CrfConfig()


def _generator_name(value: Any) -> str | None:
    # A generator section without ``name`` is the image-level CAM baseline (configs written before the other
    # generators existed omit it), so a plain ``Field(discriminator="name")`` would reject them.
    if isinstance(value, dict):
        return value.get("name", "image_cam")
    return getattr(value, "name", None)


GeneratorConfig = Annotated[
    Annotated[ImageCamGeneratorConfig, Tag("image_cam")]
    | Annotated[MultiSeedGeneratorConfig, Tag("multi_seed")]
    | Annotated[BoxGeneratorConfig, Tag("box")]
    | Annotated[ScribbleGeneratorConfig, Tag("scribble")],
    Field(discriminator=Discriminator(_generator_name)),
]


class PseudoLabelConfig(StrictModel):
    """Stage ``pseudo_labels``: CAM inference in a Ray Data actor pool, CRF as CPU tasks."""

    # One of the generator components, chosen by its ``name`` (default: the image-level CAM baseline).
    generator: GeneratorConfig = ImageCamGeneratorConfig()
    # Upper bound of the model actor pool; the pool never takes every CPU (the read stage needs one).
    max_actors: PositiveInt = 4
    batch_size: PositiveInt = 4
    use_gpu: bool | Literal["auto"] = "auto"


# --------------------------------------------------------------------------------------------- segmentation


class SegModelConfig(StrictModel):
    """DeepLab-v3 (ASPP) on a dilated ResNet."""

    name: Literal["deeplab_v3"] = "deeplab_v3"
    backbone: BackboneConfig = BackboneConfig(output_stride=16)
    aspp_channels: PositiveInt = 256


class CrossEntropyConfig(StrictModel):
    """Pixel-wise cross-entropy; label 255 is ignored. ``label_smoothing`` 0.2 is OuT's LS setting."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: Fraction = 0.0


class SegTrainConfig(StrictModel):
    """Stage ``train_seg``: DeepLab trained on the pseudo-masks (OuT: batch 10, crop 448, lr 1e-3, poly)."""

    model: SegModelConfig = SegModelConfig()
    loss: CrossEntropyConfig = CrossEntropyConfig()
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 10
    # Measure val mIoU every N epochs during training (curves, and what Tune's early stopping reads); 0 = never.
    val_every: Annotated[int, Field(ge=0)] = 1
    optimizer: OptimizerConfig = OptimizerConfig()
    head_lr_multiplier: PositiveFloat = 10.0
    augment: AugmentConfig = AugmentConfig()
    workers: WorkersConfig = WorkersConfig()
    seed: int = 0


class EvaluateConfig(StrictModel):
    """Stage ``evaluate``: val mIoU with multi-scale + flip inference, and the report."""

    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0]
    flip: bool = True
    num_samples: Annotated[int, Field(ge=0)] = 8
    max_actors: PositiveInt = 4
    batch_size: PositiveInt = 4


class PipelineConfig(StrictModel):
    """A whole experiment: ingest → train_cls → pseudo_labels → train_seg → evaluate."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "experiment"
    # Root URI of every output (local folder or s3://bucket/prefix); stages write below it.
    output: str
    dataset: DatasetConfig
    ray: RayConfig = RayConfig()
    train_cls: ClassifierTrainConfig = ClassifierTrainConfig()
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    train_seg: SegTrainConfig = SegTrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


# --------------------------------------------------------------------------------------------- loading

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str, source: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in strings, so dataset roots and storage URIs are parameters."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {where}: environment variable {name} is not set and has no default")

    return _ENV_PATTERN.sub(substitute, value)


def _apply_override(data: dict[str, Any], override: str, source: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (``2``, ``true``, ``[1, 2]``)."""
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r} is not of the form key.path=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {override!r}: {key} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"]) or "<root>"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f", got {json.dumps(got, default=str)}"
        lines.append(f"{source}: {field}: {message}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>", overrides: list[str] | None = None) -> PipelineConfig:
    """Validate a mapping (already read from YAML) into a :class:`PipelineConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # deep copy; YAML gives JSON-compatible values here
    for override in overrides or []:
        _apply_override(data, override, source)
    data = _expand_env(data, "", source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` are ``dotted.key=value`` strings applied first."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from None
    return parse_config(data if data is not None else {}, source, overrides)


def config_hash(*parts: Any) -> str:
    """A short, stable hash of config sections (and upstream hashes) used to key a stage's outputs."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
