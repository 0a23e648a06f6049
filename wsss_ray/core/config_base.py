"""The config machinery every section uses, and the sections shared across stages and methods.

A config is one YAML file describing a whole experiment (``wsss_ray.pipeline_config`` composes it). Sections are frozen
pydantic models: unknown keys and wrong types are errors that name the file and the dotted field path, e.g.
``demo.yaml: train_seg.loss.label_smoothing: Input should be less than 1, got 1.5``. Defaults follow the papers;
each default says where it comes from (``docs/methods.md`` lists the choices we made where a paper is silent).

Methods are components chosen by a ``name`` field (a loss, a classifier head, a pseudo-label generator): each
method family defines its component configs in ``wsss_ray/methods/<family>/config.py`` and
``wsss_ray.methods.registry`` joins them into the unions of the stage sections (:func:`component_union`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Scales = Annotated[list[PositiveFloat], Field(min_length=1)]


class ConfigError(ValueError):
    """A config file could not be read or validated; the message names the file and field."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # Fields a stage key leaves out while they hold these values (see ``key_dump``).
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {}


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
    # VOC: what the val split is scored against. ``official``: ``SegmentationClass`` (VOC's own masks, 255 void
    # band ignored; IRN's convention, and the devkit's) where present, else ``SegmentationClassAug``; ``aug``:
    # ``SegmentationClassAug`` first (BANA's and CDSP's convention). The train split (pseudo-mask scores) always
    # prefers ``SegmentationClassAug``, which covers all 10,582 train_aug images. COCO: ``official`` only.
    val_ground_truth: Literal["official", "aug"] = "official"

    @model_validator(mode="after")
    def _ground_truth_fits_format(self) -> DatasetConfig:
        if self.format == "coco" and self.val_ground_truth != "official":
            raise ValueError("dataset.val_ground_truth: 'aug' names VOC's SegmentationClassAug; COCO's ground "
                             "truth is rendered from its instance annotations (use 'official')")
        return self


# --------------------------------------------------------------------------------------------- runtime


class RayConfig(StrictModel):
    """How to reach Ray. ``address=None`` joins the cluster in RAY_ADDRESS, or starts a local one."""

    address: str | None = None
    num_cpus: PositiveInt | None = None
    # A local cluster's dashboard (http://127.0.0.1:8265): progress of every stage, and Ray's state API,
    # which Ray Train's placement-group cleaner polls.
    include_dashboard: bool = True
    # The cluster has an autoscaler that adds GPU nodes (KubeRay's enableInTreeAutoscaling): a GPU worker group or
    # actor pool larger than the GPUs there are now then waits for nodes instead of being sized down (use_gpu:
    # auto) or refused (use_gpu: true). None: the WSSS_AUTOSCALING environment variable ("1"; the cluster/ jobs'
    # runtime env sets it), else false. See wsss_ray/core/resources.py.
    autoscaling: bool | None = None


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

    def check_global_batch(self, batch_size: int, where: str, min_per_worker: int = 1, why: str = "") -> None:
        """``batch_size`` is the global batch, split evenly over the workers: it must divide by every worker
        count the group can have (each of min_workers..num_workers when elastic), and give each worker at least
        ``min_per_worker`` images at the largest count (``why`` says what needs them)."""
        low = self.num_workers if self.min_workers is None else self.min_workers
        bad = [w for w in range(low, self.num_workers + 1) if batch_size % w]
        if bad:
            counts = f"{where}.workers.num_workers ({bad[0]})" if self.min_workers is None else \
                f"the elastic worker counts {bad} of {where}.workers (min_workers..num_workers)"
            raise ConfigError(f"{where}.batch_size: {batch_size} is not divisible by {counts}; batch_size is the "
                              "global batch, split evenly over the workers")
        if batch_size // self.num_workers < min_per_worker:
            raise ConfigError(f"{where}.batch_size: {batch_size} over {self.num_workers} workers "
                              f"({where}.workers.num_workers) gives {batch_size // self.num_workers} image(s) per "
                              f"worker; {why} needs at least {min_per_worker}")


class SpeedConfig(StrictModel):
    """How a training step runs on CUDA; none of it changes anything on CPU (the CPU step stays torch's eager
    default). The defaults are conservative until ``bench/gpu_check.py``'s "speed options" row (each option on
    and off, side by side, on a paper-size step, and the loss curve of compiled against eager on one seed) has
    run on the target GPU: to be confirmed by that row's profile.
    """

    # torch.compile of the step (model + objective, inside DDP); the first steps pay the compilation.
    compile: bool = False
    # NHWC weights and activations (cuDNN's faster layout for many convolutions; measured 0.77-1.09x on an H200).
    channels_last: bool = False
    # SGD's implementation: "auto" is torch's default (foreach on CUDA); "fused" one kernel for every parameter.
    optimizer_impl: Literal["auto", "foreach", "fused"] = "auto"
    # cuDNN's autotuner for the fixed crop size (validation images of other sizes tune again).
    cudnn_benchmark: bool = False


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
    """DenseCRF parameters (Krähenbühl & Koltun, via pydensecrf). The class defaults are PSA's set (Ahn & Kwak
    2018, ``tool/imutils.py crf_inference``): it refines soft score maps like ours. Components whose paper uses
    another set take one of :data:`CRF_PRESETS` as their default (see :func:`crf_field`)."""

    iterations: PositiveInt = 10
    gaussian_sxy: PositiveFloat = 3.0
    gaussian_compat: Annotated[float, Field(ge=0.0)] = 3.0
    bilateral_sxy: PositiveFloat = 80.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: Annotated[float, Field(ge=0.0)] = 10.0


class ParConfig(StrictModel):
    """Pixel-adaptive refinement (PAR; AFA, Ru et al. CVPR 2022, as ToCo and KTSE run it): scores propagated
    ``iterations`` times over 8 neighbours at each dilation, weighted by a softmax of colour distance plus
    ``position_weight`` times a softmax of spatial distance (``maths.par``). Defaults: KTSE's
    ``PAR(num_iter=10, dilations=[1, 2, 4, 8, 12, 24])`` at half resolution (``refine_cams_with_bkg_v2``,
    ``down_scale=2``), with AFA's w1 = 0.3 and w2 = 0.01."""

    iterations: PositiveInt = 10
    dilations: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4, 8, 12, 24]
    # w1: colour and position distances are divided by w1 times their standard deviation over the neighbours.
    temperature: PositiveFloat = 0.3
    # w2: weight of the position kernel added to the colour kernel.
    position_weight: Annotated[float, Field(ge=0.0)] = 0.01
    # PAR runs on the image and scores resized to 1/downscale of the input (KTSE, ToCo: 2), then back.
    downscale: PositiveInt = 2


def _crf_set(gaussian: tuple[float, float], bilateral: tuple[float, float, float]) -> dict[str, float]:
    """A CRF parameter set from (gaussian sxy, compat) and (bilateral sxy, srgb, compat); 10 iterations."""
    return {"iterations": 10, "gaussian_sxy": gaussian[0], "gaussian_compat": gaussian[1],
            "bilateral_sxy": bilateral[0], "bilateral_srgb": bilateral[1], "bilateral_compat": bilateral[2]}


# The published DenseCRF settings a config can name (``crf: {preset: deeplab_v2_resnet}``); other keys given
# next to ``preset`` override single values of the set.
CRF_PRESETS: dict[str, dict[str, float]] = {
    # PSA (soft CAM scores as unary): tool/imutils.py crf_inference, sxy 80/scale, srgb 13, compat 10.
    "psa": _crf_set((3.0, 3.0), (80.0, 13.0, 10.0)),
    # IRN (hard-label unary, gt_prob 0.7): misc/imutils.py crf_inference_label.
    "irn": _crf_set((3.0, 3.0), (50.0, 5.0, 10.0)),
    # BANA stage 2 (Y_crf generation): configs/stage2.yml DCRF [4, 55, 3, 3, 3].
    "bana_stage2": _crf_set((3.0, 3.0), (55.0, 3.0, 4.0)),
    # DeepLab-v2 ResNet-101 test-time CRF (deeplab-pytorch configs/voc12.yaml; BANA configs/stage3_res.yml).
    "deeplab_v2_resnet": _crf_set((1.0, 3.0), (67.0, 3.0, 4.0)),
    # DeepLab-v1 (VGG) test-time CRF (BANA configs/stage3_vgg.yml DCRF [4, 121, 5, 3, 3]).
    "deeplab_v1_vgg": _crf_set((3.0, 3.0), (121.0, 5.0, 4.0)),
}


def _expand_crf(default: str, value: Any) -> Any:
    """A mapping given for a CRF field is read over a preset: its own ``preset`` or the field's ``default``, so a
    partial section (``{bilateral_sxy: 30}``) keeps the rest of the component's published set."""
    if not isinstance(value, dict):
        return value
    name = value.get("preset", default)
    if name not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset {name!r}; expected one of {sorted(CRF_PRESETS)}")
    return {**CRF_PRESETS[name], **{k: v for k, v in value.items() if k != "preset"}}


def crf_field(default: str) -> Any:
    """The type of a CRF section whose unset values come from ``CRF_PRESETS[default]`` (``None`` passes)."""
    return BeforeValidator(functools.partial(_expand_crf, default))


def crf_preset(name: str) -> CrfConfig:
    """The :class:`CrfConfig` of a named preset."""
    return CrfConfig(**CRF_PRESETS[name])



class SegModelConfig(StrictModel):
    """DeepLab-v2 (ASPP 6/12/18/24), v3 (ASPP + image pooling) or v3+ (v3 + decoder) on a dilated ResNet."""

    name: Literal["deeplab_v2", "deeplab_v3", "deeplab_v3plus"] = "deeplab_v3"
    backbone: BackboneConfig = BackboneConfig(output_stride=16)
    aspp_channels: PositiveInt = 256
    # Synchronised BatchNorm across DDP workers. "auto" (default): on with several CUDA workers, so BatchNorm sees
    # the global batch and results do not depend on the worker count (issue 14 point 8); off on CPU, where torch
    # has no SyncBatchNorm (gloo), and with one worker. true: also on CPU asked for (and reported unavailable).
    sync_bn: bool | Literal["auto"] = "auto"
    # The final 1x1 classifier: ``conv`` = W·φ + b; ``cosine`` = cosine_scale · cos(φ, W_c), no bias (BANA's
    # segmenter, footnote 4 and stage3_vgg.py, TEMP 20). ``train_seg`` picks cosine for the NAL loss when the
    # config leaves it unset or says ``auto`` (wsss_ray.pipeline_config.SegTrainConfig).
    classifier: Literal["conv", "cosine"] = "conv"
    cosine_scale: PositiveFloat = 20.0

    # Fields added after stage keys were first published, at the values that reproduce the earlier models: a
    # stage key leaves them out (``key_dump``), so existing configs keep their keys.
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"classifier": "conv", "cosine_scale": 20.0}


def format_errors(source: str, error: ValidationError, sources: dict[str, str] | None = None) -> str:
    """One line per error: ``<source>: <dotted field>: <message>, got <value>``. ``sources`` maps a dotted field
    prefix to the source that set it (``--set key=value``), named instead of ``source`` for errors below it."""
    lines = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"] if part not in COMPONENT_TAGS) or "<root>"
        where = next((label for prefix, label in (sources or {}).items()
                      if field == prefix or field.startswith(prefix + ".")), source)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        if err["type"] == "union_tag_invalid":  # an unknown component name: point at the name field
            field += ".name"
            message = f"unknown {err['ctx']['tag']!r}; expected one of {err['ctx']['expected_tags']}"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f", got {json.dumps(got, default=str)}"
        lines.append(f"{where}: {field}: {message}{shown}")
    return "\n".join(lines)



def key_dump(section: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    """``section.model_dump(mode="json")`` without the fields each (nested) model declares ``KEY_NEUTRAL`` at
    their neutral values: what a stage key hashes. A field added later at a value that reproduces the earlier
    outputs then leaves every existing key, and every finished stage, as it was; any other value changes it."""
    return _drop_neutral(section, section.model_dump(mode="json", exclude=exclude))


def _drop_neutral(model: Any, data: Any) -> Any:
    if not isinstance(model, BaseModel) or not isinstance(data, dict):
        return data
    neutral = getattr(model, "KEY_NEUTRAL", {})
    out = {}
    for key, value in data.items():
        if key in neutral and getattr(model, key) == neutral[key]:
            continue
        out[key] = _drop_neutral(getattr(model, key, None), value)
    return out


def config_hash(*parts: Any) -> str:
    """A short, stable hash of config sections (and upstream hashes) used to key a stage's outputs."""
    payload = [key_dump(p) if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
