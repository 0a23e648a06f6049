"""The experiment's config: one section per pipeline stage, composed into ``PipelineConfig``, and its loading.

A config is one YAML file describing a whole experiment: the dataset, where results go, and one section per
pipeline stage. The sections shared with the layers below (dataset, backbone, workers, optimiser, CRF, ...) and
the config machinery live in ``wsss_ray.core.config_base``; each method family defines its component configs in its
folder, and the unions here come from ``wsss_ray.methods.registry``. Every rule that ties two sections together is
checked once, in :meth:`PipelineConfig._components_fit`, from what the components declare.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from wsss_ray.core.config_base import (
    AugmentConfig,
    BackboneConfig,
    ConfigError,
    CrfConfig,
    DatasetConfig,
    OptimizerConfig,
    PositiveFloat,
    PositiveInt,
    RayConfig,
    SegModelConfig,
    SpeedConfig,
    StrictModel,
    WorkersConfig,
    config_hash,
    crf_field,
    format_errors,
)
from wsss_ray.methods.registry import (
    CLASSIFIER_HEADS,
    CLASSIFIER_OBJECTIVES,
    CORRECTORS,
    GENERATORS,
    SEGMENTATION_OBJECTIVES,
    EarlyLearningConfig,
    segmentation_maps,
)

__all__ = ["ClassifierTrainConfig", "ConfigError", "EvaluateConfig", "PipelineConfig", "PseudoLabelConfig",
           "SegTrainConfig", "config_hash", "load_config", "parse_config"]

ClassifierHeadConfig = CLASSIFIER_HEADS.config_union()
ClassifierLossConfig = CLASSIFIER_OBJECTIVES.config_union()
GeneratorConfig = GENERATORS.config_union()
SegLossConfig = SEGMENTATION_OBJECTIVES.config_union()
CorrectorConfig = CORRECTORS.config_union()


class ClassifierTrainConfig(StrictModel):
    """Stage ``train_cls``: the classifier whose CAMs seed the pseudo-masks."""

    backbone: BackboneConfig = BackboneConfig()
    head: ClassifierHeadConfig = CLASSIFIER_HEADS.default_config()
    loss: ClassifierLossConfig = CLASSIFIER_OBJECTIVES.default_config()
    epochs: PositiveInt = 5
    # The global batch, split evenly over the workers (it must divide by the worker count).
    batch_size: PositiveInt = 16
    # IRN/PSA-style classifier training: lr 0.01 with a 10x head multiplier, wd 1e-4.
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.01, weight_decay=1e-4)
    head_lr_multiplier: PositiveFloat = 10.0
    augment: AugmentConfig = AugmentConfig(crop_size=512)
    workers: WorkersConfig = WorkersConfig()
    # Seeds the initial weights, each epoch's shuffle and every crop: the same config trains the same way twice.
    seed: Annotated[int, Field(ge=0)] = 0
    # SyncBatchNorm across several CUDA workers ("auto"), as train_seg.model.sync_bn.
    sync_bn: bool | Literal["auto"] = "auto"
    # How the step runs on CUDA (torch.compile, channels_last, fused SGD); changes speed, not results, and
    # nothing on CPU. Not part of the stage key.
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="after")
    def _head_matches_loss(self) -> ClassifierTrainConfig:
        # KTSE's losses read the C+1-channel CAM features of its head; BAP's loss the box and background
        # features of its head (each declares the other in the registry). Multi-label soft margin works with any
        # head's image logits.
        head, loss = CLASSIFIER_HEADS[self.head.name], CLASSIFIER_OBJECTIVES[self.loss.name]
        method = head.requires.get("loss") or loss.requires.get("head")
        if method is not None and (head.requires.get("loss"), loss.requires.get("head")) != (loss.name, head.name):
            raise ValueError(f"loss {self.loss.name!r} and head {self.head.name!r} do not go together: "
                             f"the {method!r} loss needs the {method!r} head and the other way round")
        self.workers.check_global_batch(self.batch_size, "train_cls")
        return self

    @model_validator(mode="after")
    def _loss_fits_section(self) -> ClassifierTrainConfig:
        # The loss's own rules against the section (KTSE: its warm-up must leave epochs for the full objective).
        CLASSIFIER_OBJECTIVES.implementation(self.loss.name).check(self.loss, self)
        return self


class PseudoLabelConfig(StrictModel):
    """Stage ``pseudo_labels``: CAM inference in a Ray Data actor pool, CRF as CPU tasks."""

    # One of the generator components, chosen by its ``name`` (default: the image-level CAM baseline).
    generator: GeneratorConfig = GENERATORS.default_config()
    # Upper bound of the model actor pool; the pool never takes every CPU (the read stage needs one).
    max_actors: PositiveInt = 4
    batch_size: PositiveInt = 4
    use_gpu: bool | Literal["auto"] = "auto"


class SegTrainConfig(StrictModel):
    """Stage ``train_seg``: DeepLab trained on the pseudo-masks (OuT: batch 10, crop 448, lr 1e-3, poly)."""

    model: SegModelConfig = SegModelConfig()
    loss: SegLossConfig = SEGMENTATION_OBJECTIVES.default_config()
    # OuT's online pseudo-mask corrector; None trains on the pseudo-masks as they are.
    corrector: CorrectorConfig | None = None
    # Robust early-learning's parameter selection; None updates every parameter with the loss gradient.
    early_learning: EarlyLearningConfig | None = None
    epochs: PositiveInt = 20
    # The global batch (OuT: 10), split evenly over the workers (it must divide by the worker count).
    batch_size: PositiveInt = 10
    # Measure val mIoU every N epochs during training (curves, and what Tune's early stopping reads); 0 = never.
    val_every: Annotated[int, Field(ge=0)] = 1
    optimizer: OptimizerConfig = OptimizerConfig()
    head_lr_multiplier: PositiveFloat = 10.0
    augment: AugmentConfig = AugmentConfig()
    workers: WorkersConfig = WorkersConfig()
    # How the step runs on CUDA (torch.compile, channels_last, fused SGD); see train_cls.speed.
    speed: SpeedConfig = SpeedConfig()
    # Seeds the initial weights, each epoch's shuffle and every crop: the same config trains the same way twice.
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="before")
    @classmethod
    def _resolve_classifier(cls, data: Any) -> Any:
        """``model.classifier`` left unset (or ``auto``): the loss's own (``model_classifier`` of its objective:
        cosine for BANA's NAL, footnote 4), the plain 1x1 conv otherwise. The model and the loss are both in this
        section, so this is where the loss's default for the model is decided."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        if isinstance(model, SegModelConfig):
            if "classifier" in model.model_fields_set:
                return data
            model = model.model_dump()
        model = dict(model) if isinstance(model, dict) else {}
        if model.get("classifier", "auto") != "auto":
            return data
        loss = data.get("loss")
        name = loss.get("name") if isinstance(loss, dict) else getattr(loss, "name", None)
        return {**data, "model": {**model, "classifier": _model_classifier(name)}}

    @model_validator(mode="after")
    def _global_batch(self) -> SegTrainConfig:
        # DeepLab-v3's image-pooling branch normalises a 1×1 map: BatchNorm in training mode needs two images.
        pooled = self.model.name in ("deeplab_v3", "deeplab_v3plus") and self.model.sync_bn is not True
        self.workers.check_global_batch(self.batch_size, "train_seg", 2 if pooled else 1,
                                        f"the image-pooling BatchNorm of {self.model.name}")
        return self


def _model_classifier(loss: Any) -> str:
    """The classifier a loss's paper trains with (an objective may declare ``model_classifier``), else conv."""
    if not isinstance(loss, str) or loss not in SEGMENTATION_OBJECTIVES:
        return "conv"  # a bad loss name is reported by the loss field itself
    return SEGMENTATION_OBJECTIVES.implementation(loss).model_classifier


class EvaluateConfig(StrictModel):
    """Stage ``evaluate``: val mIoU with multi-scale + flip inference, and the report."""

    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0]  # noqa: RUF012 - a pydantic field
    flip: bool = True
    # DenseCRF post-processing of the predictions (OuT, BANA); None scores the network's argmax. Enabled with
    # ``{}`` it is DeepLab-v2 ResNet's test-time CRF (BANA stage3_res.yml: bilateral 4/67/3, Gaussian 3/1);
    # ``{preset: <name>}`` picks another of CRF_PRESETS, other keys override single values.
    crf: Annotated[CrfConfig | None, crf_field("deeplab_v2_resnet")] = None
    num_samples: Annotated[int, Field(ge=0)] = 8
    max_actors: PositiveInt = 4
    batch_size: PositiveInt = 4
    # The prediction actor pool on GPUs when the cluster has them (``auto``). Not part of the stage key: it
    # changes speed, not results.
    use_gpu: bool | Literal["auto"] = "auto"


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


    @model_validator(mode="after")
    def _components_fit(self) -> PipelineConfig:
        """Every cross-section rule, from what the chosen components declare: each ``requires`` of the registry
        lines (the supervision, the generator, the head and the loss), then each objective's own ``check``."""
        cls, generator, loss = self.train_cls, self.pseudo_labels.generator, self.train_seg.loss
        chosen = {"supervision": self.dataset.supervision, "generator": generator.name, "head": cls.head.name,
                  "loss": cls.loss.name}
        for registry, name in ((CLASSIFIER_HEADS, cls.head.name), (CLASSIFIER_OBJECTIVES, cls.loss.name),
                               (GENERATORS, generator.name), (SEGMENTATION_OBJECTIVES, loss.name)):
            component = registry[name]
            for need, value in component.requires.items():
                if chosen[need] != value:
                    raise ValueError(_mismatch(registry.field, component, need, value, chosen))
        SEGMENTATION_OBJECTIVES.implementation(loss.name).check(loss, self)
        if self.train_seg.corrector is not None and "label" not in segmentation_maps(loss):
            raise ValueError(f"train_seg.corrector: OuT corrects the pseudo-mask, which loss {loss.name!r} "
                             "does not read")
        return self


# The config field each requirement names, for the error message.
_REQUIRED_FIELD = {"supervision": "dataset.supervision", "generator": "pseudo_labels.generator",
                   "head": "train_cls.head", "loss": "train_cls.loss"}


def _mismatch(field: str, component: Any, need: str, value: str, chosen: dict[str, str]) -> str:
    """The error for a component whose ``requires`` does not hold (wording kept from the first releases)."""
    name = component.name
    if need == "generator":
        return (f"{field} {name!r} reads the outputs of the {value!r} pseudo-label generator, but "
                f"pseudo_labels.generator is {chosen['generator']!r}")
    why = f" {component.because}:" if component.because else ""
    if need == "supervision":
        return f"{field} {name!r}{why} needs dataset.supervision {value}"
    return f"{field} {name!r}{why} needs {_REQUIRED_FIELD[need]} {value!r}, but it is {chosen[need]!r}"


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
        raise ConfigError(f"{source}: not of the form key.path=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {override!r}: {key} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)




def parse_config(data: Any, source: str = "<config>", overrides: list[str] | None = None,
                 override_source: str | None = None) -> PipelineConfig:
    """Validate a mapping (already read from YAML) into a :class:`PipelineConfig`.

    With ``override_source`` (``--set``), an error in a field an override set names the override, not ``source``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # deep copy; YAML gives JSON-compatible values here
    for override in overrides or []:
        _apply_override(data, override, f"{override_source} {override}" if override_source else source)
    data = _expand_env(data, "", source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        sources = {o.split("=", 1)[0].strip(): f"{override_source} {o}" for o in overrides or []} \
            if override_source else {}
        raise ConfigError(format_errors(source, error, sources)) from None


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, anything else (lists included) is replaced.

    A section naming another component (``generator: {name: box}`` over ``{name: image_cam, ...}``) replaces
    the base's section instead: the other component's fields mean nothing to it.
    """
    merged = dict(base)
    for key, value in child.items():
        old = merged.get(key)
        same_component = not isinstance(value, dict) or "name" not in value or (
            isinstance(old, dict) and old.get("name") == value["name"])
        merged[key] = _deep_merge(old, value) if isinstance(value, dict) and isinstance(
            old, dict) and same_component else value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file and, if it names one, its ``base`` (a path relative to the file) underneath it.

    A method's config then says only what differs from the experiment it varies (``base: demo.yaml``).
    """
    source = str(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{source}: base: must be a path to a config file, got {json.dumps(base)}")
    base_path = (path.parent / base).resolve()
    if base_path in chain:
        raise ConfigError(f"{source}: base: {base} includes itself")
    return _deep_merge(_read_yaml(base_path, (*chain, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` are ``dotted.key=value`` strings applied first."""
    return parse_config(_read_yaml(Path(path)), str(path), overrides, override_source="--set")

