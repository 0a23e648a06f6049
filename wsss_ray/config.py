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


# Every component name; pydantic puts the chosen one into an error's location, which we drop again.
_COMPONENT_TAGS: set[str] = set()


def _tagged(*models: type[BaseModel]) -> Any:
    """``Annotated[Model, Tag(<its name literal>)]`` for each model, joined into one union."""
    union: Any = None
    for model in models:
        tag = model.model_fields["name"].default
        _COMPONENT_TAGS.add(tag)
        tagged = Annotated[model, Tag(tag)]
        union = tagged if union is None else union | tagged
    return union


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


# --------------------------------------------------------------------------------------------- classifier


class GapHeadConfig(StrictModel):
    """Global average pooling over CAM features, the CAM baseline (Zhou et al. 2016)."""

    name: Literal["gap"] = "gap"


class KtseHeadConfig(StrictModel):
    """KTSE's classifier head: C+1-channel CAM features (background included) pooled by a gated pyramid pooling
    (GPP) layer (Yoon et al. ECCV 2022), the "strong baseline" of KTSE's Table 6."""

    name: Literal["ktse"] = "ktse"
    # Pyramid levels of GPP: the feature map is pooled over 1x1, 2x2, ... grids and the levels are gated.
    pyramid: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4]


class BapHeadConfig(StrictModel):
    """BANA's background-aware pooling: background queries from an N×N grid outside the boxes, attention A,
    box features pooled with (1 − A), a cosine (L+1)-way classifier over boxes and background."""

    name: Literal["bap"] = "bap"
    # N of the N×N grid of background queries while training (BANA: 4; generation uses the generator's grid).
    grid: PositiveInt = 4
    # Scale of the cosine classifier's logits: a cosine in [-1, 1] is too flat for a softmax. BANA does not
    # state it here; 20 is the usual value of cosine classifiers.
    scale: PositiveFloat = 20.0


ClassifierHeadConfig = Annotated[_tagged(GapHeadConfig, KtseHeadConfig, BapHeadConfig), Field(discriminator=_name_or("gap"))]


class MultiLabelSoftMarginConfig(StrictModel):
    """The multi-label soft-margin loss every paper trains its classifier with."""

    name: Literal["multilabel_soft_margin"] = "multilabel_soft_margin"


class KtseLossConfig(StrictModel):
    """KTSE's objective: L_cls + L_kt (SIE) + L_ce + λ_inter·L_inter (SSR) + L_global + L_local (MGA).

    The three switches give the rows of KTSE's ablation (Table 6): base (GPP + L_cls), +SIE, +SIE+SSR, all.
    """

    name: Literal["ktse"] = "ktse"
    sie: bool = True
    ssr: bool = True
    mga: bool = True
    # SSR: anchor-CAM pseudo-label thresholds, foreground weight of its CE, the foreground threshold of the
    # inter-class loss's mask M^f (max CAM ≥ β_o) and that loss's weight.
    beta_h: Fraction = 0.3
    beta_l: Fraction = 0.15
    omega_fg: Annotated[float, Field(ge=0.0)] = 0.0125
    beta_o: Fraction = 0.2
    lambda_inter: Annotated[float, Field(ge=0.0)] = 0.005
    # MGA: the most discriminative region (normalised CAM above this) is erased for the masked branch.
    erase_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.6

    @model_validator(mode="after")
    def _thresholds(self) -> KtseLossConfig:
        if self.beta_l > self.beta_h:
            raise ValueError(f"beta_l ({self.beta_l}) must not exceed beta_h ({self.beta_h})")
        return self


class BapLossConfig(StrictModel):
    """BANA's classifier loss: (L+1)-way cross-entropy over box features and background queries."""

    name: Literal["bap"] = "bap"


ClassifierLossConfig = Annotated[_tagged(MultiLabelSoftMarginConfig, KtseLossConfig, BapLossConfig),
                                 Field(discriminator=_name_or("multilabel_soft_margin"))]


class ClassifierTrainConfig(StrictModel):
    """Stage ``train_cls``: the classifier whose CAMs seed the pseudo-masks."""

    backbone: BackboneConfig = BackboneConfig()
    head: ClassifierHeadConfig = GapHeadConfig()
    loss: ClassifierLossConfig = MultiLabelSoftMarginConfig()
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 16
    # IRN/PSA-style classifier training: lr 0.01 with a 10x head multiplier, wd 1e-4.
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.01, weight_decay=1e-4)
    head_lr_multiplier: PositiveFloat = 10.0
    augment: AugmentConfig = AugmentConfig(crop_size=512)
    workers: WorkersConfig = WorkersConfig()
    # Seeds the initial weights, each epoch's shuffle and every crop: the same config trains the same way twice.
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _head_matches_loss(self) -> ClassifierTrainConfig:
        # KTSE's losses read the C+1-channel CAM features of its head; BAP's loss the box and background
        # features of its head. Multi-label soft margin works with any head's image logits.
        for method in ("ktse", "bap"):
            if (self.loss.name == method) != (self.head.name == method):
                raise ValueError(f"loss {self.loss.name!r} and head {self.head.name!r} do not go together: "
                                 f"the {method!r} loss needs the {method!r} head and the other way round")
        return self


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


GeneratorConfig = Annotated[
    _tagged(ImageCamGeneratorConfig, MultiSeedGeneratorConfig, BoxGeneratorConfig, ScribbleGeneratorConfig),
    Field(discriminator=_name_or("image_cam")),
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
    """DeepLab-v2 (ASPP 6/12/18/24), v3 (ASPP + image pooling) or v3+ (v3 + decoder) on a dilated ResNet."""

    name: Literal["deeplab_v2", "deeplab_v3", "deeplab_v3plus"] = "deeplab_v3"
    backbone: BackboneConfig = BackboneConfig(output_stride=16)
    aspp_channels: PositiveInt = 256
    # Synchronised BatchNorm across DDP workers (small per-GPU batches); ignored with one worker.
    sync_bn: bool = False


class CrossEntropyConfig(StrictModel):
    """Pixel-wise cross-entropy; label 255 is ignored. ``label_smoothing`` 0.2 is OuT's LS setting."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: Fraction = 0.0


class SymmetricCrossEntropyConfig(StrictModel):
    """SCE (Wang et al. 2019): α·CE + β·RCE, RCE = −Σ p log y with log 0 clipped to ``log_clip`` (A = −4)."""

    name: Literal["sce"] = "sce"
    alpha: Annotated[float, Field(ge=0.0)] = 0.1
    beta: Annotated[float, Field(ge=0.0)] = 1.0
    log_clip: Annotated[float, Field(lt=0.0)] = -4.0


class CurriculumConfig(StrictModel):
    """Noise-pruned curriculum loss: the fraction ϵ of labelled pixels with the largest loss is dropped."""

    name: Literal["curriculum"] = "curriculum"
    epsilon: Fraction = 0.25


class NoiseAwareConfig(StrictModel):
    """BANA's NAL: CE where Y_crf == Y_ret, σ-weighted CE elsewhere; L = L_ce + λ·L_wce (γ = 7, λ = 0.1).
    Needs the ``box`` generator's outputs (Y_crf = ``pseudo``, Y_ret = ``retrieved``)."""

    name: Literal["nal"] = "nal"
    gamma: Annotated[float, Field(ge=0.0)] = 7.0
    lambda_wce: Annotated[float, Field(ge=0.0)] = 0.1


class CdspConfig(StrictModel):
    """CDSP: partial CE on scribbles + label-smoothed CE on the pseudo-label (basic loss), LoRM on the
    stride-8/16 features and the distance entropy loss from the ``scribble`` generator's distance maps."""

    name: Literal["cdsp"] = "cdsp"
    label_smoothing: Fraction = 0.1
    lorm: bool = True
    lorm_weight: Annotated[float, Field(ge=0.0)] = 1.0
    # Channels of LoRM's query/key projections (1x1 convs); the paper does not say, a quarter of 256 is usual.
    lorm_channels: PositiveInt = 64
    distance: bool = True
    distance_weight: Annotated[float, Field(ge=0.0)] = 1.0


class MspnLossConfig(StrictModel):
    """MSPN positive–negative hybrid learning over the ``multi_seed`` generator's vote (our reading of an
    illegible paper, see ``training/noise_robust.py``): CE on clean pixels (agreement ≥ t), negative learning on
    labels the image tags rule out, indirect negative learning on labels no seed proposed, and a confidence
    penalty on noisy pixels."""

    name: Literal["mspn"] = "mspn"
    # t: a pixel is clean when at least t seeds agree; read from the stored agreement map, so t can be swept
    # without regenerating the seeds. Must not exceed the generator's number of seeds.
    agreement: PositiveInt = 4
    negative_weight: Annotated[float, Field(ge=0.0)] = 1.0
    indirect_weight: Annotated[float, Field(ge=0.0)] = 1.0
    constraint_weight: Annotated[float, Field(ge=0.0)] = 0.1


SegLossConfig = Annotated[
    _tagged(CrossEntropyConfig, SymmetricCrossEntropyConfig, CurriculumConfig, NoiseAwareConfig, CdspConfig,
            MspnLossConfig),
    Field(discriminator=_name_or("cross_entropy")),
]


class OutCorrectorConfig(StrictModel):
    """OuT: an EMA teacher (v = 0.999) corrects the pseudo-masks from the inflection epoch on."""

    name: Literal["out"] = "out"
    # Epoch (1-based) from which masks are corrected; OuT sees the inflection at 3-5 and uses 4.
    inflection_epoch: PositiveInt = 4
    strategy: Literal["replace", "ema", "nnss"] = "nnss"
    # online: correct the original pseudo-mask each time; cumulative: the corrected mask is carried forward.
    mode: Literal["online", "cumulative"] = "online"
    ema_decay: Fraction = 0.999
    # Teacher confidence needed to replace a label (``replace``) or to keep a pixel (``nnss``; OuT: 0.7).
    confidence: Fraction = 0.7
    # v_m of the EMA mask update M_t = v_m·M_{t−1} + (1 − v_m)·P_t (``ema``). The paper does not give it; with
    # the one-hot pseudo-mask as M_{t−1} a label only changes when v_m < 0.5 (see training/correction.py).
    mask_momentum: Fraction = 0.3
    # Input scale of the teacher's forward pass (its probabilities are upsampled back). 1.0 is the paper; 0.5
    # cuts the teacher's cost to a quarter (bench/robust_training.py) for coarser corrections at boundaries.
    teacher_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # Number format of the teacher's forward pass. The teacher only ranks classes and gates them at
    # ``confidence``, which bfloat16 barely moves (bench/robust_training.py: >99% identical argmax), at about
    # half the cost where the hardware runs bf16 natively. ``auto``: bfloat16 on such hardware (CUDA with bf16,
    # CPUs with AVX-512 BF16 / AMX), float32 elsewhere (emulated bf16 would be slower).
    teacher_precision: Literal["auto", "float32", "bfloat16"] = "auto"


class EarlyLearningConfig(StrictModel):
    """Robust early-learning (Xia et al. ICLR 2021): only the top-K fraction of parameters by |∇L·w| get the loss
    gradient; the others only decay (weight decay), so they cannot memorise noisy labels."""

    key_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4


class SegTrainConfig(StrictModel):
    """Stage ``train_seg``: DeepLab trained on the pseudo-masks (OuT: batch 10, crop 448, lr 1e-3, poly)."""

    model: SegModelConfig = SegModelConfig()
    loss: SegLossConfig = CrossEntropyConfig()
    # OuT's online pseudo-mask corrector; None trains on the pseudo-masks as they are.
    corrector: OutCorrectorConfig | None = None
    # Robust early-learning's parameter selection; None updates every parameter with the loss gradient.
    early_learning: EarlyLearningConfig | None = None
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 10
    # Measure val mIoU every N epochs during training (curves, and what Tune's early stopping reads); 0 = never.
    val_every: Annotated[int, Field(ge=0)] = 1
    optimizer: OptimizerConfig = OptimizerConfig()
    head_lr_multiplier: PositiveFloat = 10.0
    augment: AugmentConfig = AugmentConfig()
    workers: WorkersConfig = WorkersConfig()
    # Seeds the initial weights, each epoch's shuffle and every crop: the same config trains the same way twice.
    seed: Annotated[int, Field(ge=0)] = 0


class EvaluateConfig(StrictModel):
    """Stage ``evaluate``: val mIoU with multi-scale + flip inference, and the report."""

    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0]
    flip: bool = True
    # DenseCRF post-processing of the predictions (OuT, BANA); None scores the network's argmax.
    crf: CrfConfig | None = None
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

    @model_validator(mode="after")
    def _loss_has_its_pseudo_labels(self) -> PipelineConfig:
        # Losses that read more than the pseudo-mask need the generator that writes it.
        needs = {"nal": "box", "cdsp": "scribble", "mspn": "multi_seed"}
        loss, generator = self.train_seg.loss, self.pseudo_labels.generator
        if loss.name in needs and generator.name != needs[loss.name]:
            raise ValueError(f"train_seg.loss {loss.name!r} reads the outputs of the {needs[loss.name]!r} "
                             f"pseudo-label generator, but pseudo_labels.generator is {generator.name!r}")
        if loss.name == "mspn" and loss.agreement > len(generator.seeds):  # type: ignore[union-attr]
            raise ValueError(f"train_seg.loss.agreement ({loss.agreement}) exceeds the generator's "
                             f"{len(generator.seeds)} seeds")  # type: ignore[union-attr]
        if self.train_cls.head.name == "bap" and self.dataset.supervision != "boxes":
            raise ValueError("train_cls.head 'bap' pools features inside boxes: it needs dataset.supervision boxes")
        if generator.name == "scribble" and self.dataset.supervision != "scribbles":
            raise ValueError("pseudo_labels.generator 'scribble' needs dataset.supervision scribbles")
        return self


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
        field = ".".join(str(part) for part in err["loc"] if part not in _COMPONENT_TAGS) or "<root>"
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
    return parse_config(_read_yaml(Path(path)), str(path), overrides)


def config_hash(*parts: Any) -> str:
    """A short, stable hash of config sections (and upstream hashes) used to key a stage's outputs."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
