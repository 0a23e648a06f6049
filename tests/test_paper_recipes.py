"""The paper recipes (jobs/configs/papers/) against the papers, so that a recipe cannot drift unnoticed.

``PAPER`` is transcribed by hand from the papers (/work/shared/papers, summarised in docs/methods.md) and, where a
paper is silent, from the authors' code; each value cites where it comes from. Each recipe is loaded with the
project's own loader (``load_config``: ``base`` files, ``${VAR}`` expansion, pydantic validation) with the
environment variables pointing at dummy paths, and every transcribed value is compared with the typed config.
The pre-flight check then runs on an imageless VOC / COCO layout (``config check --offline``). No Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wsss_ray.cli import main
from wsss_ray.core.config_base import CRF_PRESETS
from wsss_ray.pipeline_config import PipelineConfig, load_config

RECIPES = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "papers"

# DenseCRF parameter sets, as (Gaussian sxy, compat), (bilateral sxy, srgb, compat), 10 iterations.
BANA_STAGE2_CRF = {"iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0, "bilateral_sxy": 55.0,
                   "bilateral_srgb": 3.0, "bilateral_compat": 4.0}  # BANA stage2.yml DCRF [4, 55, 3, 3, 3]
DEEPLAB_V2_CRF = {"iterations": 10, "gaussian_sxy": 1.0, "gaussian_compat": 3.0, "bilateral_sxy": 67.0,
                  "bilateral_srgb": 3.0, "bilateral_compat": 4.0}  # BANA stage3_res.yml [4, 67, 3, 3, 1]; BECO crf.py
PSA_CRF = {"iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0, "bilateral_sxy": 80.0,
           "bilateral_srgb": 13.0, "bilateral_compat": 10.0}  # PSA crf_inference (papers silent: project default)

# IRN's CAM classifier (irn run_sample.py defaults), for the papers that build on IRN or say nothing legible.
IRN_CLASSIFIER: dict[str, tuple[Any, str]] = {
    "train_cls.backbone.output_stride": (16, "IRN resnet50_cam strides (2, 2, 2, 1)"),
    "train_cls.augment.crop_size": (512, "IRN run_sample.py --cam_crop_size 512"),
    "train_cls.batch_size": (16, "IRN --cam_batch_size 16"),
    "train_cls.epochs": (5, "IRN --cam_num_epoches 5"),
    "train_cls.optimizer.lr": (0.1, "IRN --cam_learning_rate 0.1"),
    "train_cls.optimizer.weight_decay": (1e-4, "IRN --cam_weight_decay 1e-4"),
    "train_cls.optimizer.schedule": ("poly", "IRN PolyOptimizer"),
    "train_cls.head_lr_multiplier": (10.0, "IRN train_cam: 10x lr on the classifier"),
    "pseudo_labels.generator.scales": ([1.0, 0.5, 1.5, 2.0], "IRN --cam_scales"),
    "pseudo_labels.generator.bg_score": (0.15, "IRN --cam_eval_thres 0.15"),
}

PAPER: dict[str, dict[str, tuple[Any, str]]] = {
    "bana_voc.yaml": {
        "dataset.supervision": ("boxes", "BANA Sec. 3"),
        "train_cls.augment.crop_size": (321, "BANA Sec. 4.1: random cropping 321x321"),
        "train_cls.batch_size": (20, "BANA Sec. 4.1: batch size of 20"),
        "train_cls.epochs": (15, "BANA Sec. 4.1: 15 epochs"),
        "train_cls.optimizer.lr": (1e-4, "BANA Sec. 4.1: 1e-4 for the pre-trained layers"),
        "train_cls.head_lr_multiplier": (10.0, "BANA Sec. 4.1: 1e-3 for the classifier"),
        "train_cls.optimizer.momentum": (0.9, "BANA Sec. 4.1"),
        "train_cls.optimizer.weight_decay": (5e-4, "BANA Sec. 4.1"),
        "train_cls.backbone.output_stride": (8, "BANA stage1.py: VGG-16 at output stride 8"),
        "train_cls.head.grid": (4, "BANA Sec. 4.1: N = 4 for training"),
        "pseudo_labels.generator.grid": (1, "BANA Sec. 4.1: N = 1 for generation"),
        "pseudo_labels.generator.bg_threshold": (0.99, "BANA Sec. 4.1: thresholding A with 0.99"),
        "pseudo_labels.generator.scales": ([1.0], "BANA stage2.py: one scale"),
        "pseudo_labels.generator.crf": (BANA_STAGE2_CRF, "BANA stage2.yml DCRF"),
        "train_seg.model.name": ("deeplab_v2", "BANA Table 5: DeepLab-V2"),
        "train_seg.model.backbone.name": ("resnet101", "BANA Table 5: ResNet-101"),
        "train_seg.model.backbone.output_stride": (8, "DeepLab-V2"),
        "train_seg.model.classifier": ("cosine", "BANA footnote 4"),
        "train_seg.loss.gamma": (7.0, "BANA Sec. 4.1: gamma = 7"),
        "train_seg.loss.lambda_wce": (0.1, "BANA Sec. 4.1: lambda = 0.1"),
        "train_seg.epochs": (20, "BANA Sec. 4.1: DeepLab-V2 for 20 epochs"),
        "train_seg.batch_size": (10, "BANA Sec. 4.1: batch size 10"),
        "train_seg.augment.crop_size": (321, "BANA stage3_res.yml CROP_SIZE 321"),
        "train_seg.optimizer.lr": (2.5e-4, "BANA stage3_res.yml LR 2.5e-4"),
        "train_seg.optimizer.schedule": ("poly", "BANA Sec. 4.1: poly schedule"),
        "train_seg.optimizer.poly_power": (0.9, "BANA stage3_res.yml GAMMA 0.9"),
        "evaluate.scales": ([1.0, 0.5, 0.75, 1.5], "BANA test.py: 1 + [0.5, 0.75, 1.5]"),
        "evaluate.flip": (True, "BANA test.py"),
        "evaluate.crf": (DEEPLAB_V2_CRF, "BANA stage3_res.yml DCRF [4, 67, 3, 3, 1]"),
    },
    "cdsp_voc.yaml": {
        **IRN_CLASSIFIER,  # its bg_score replaced below
        "dataset.supervision": ("scribbles", "CDSP Method: scribbles"),
        "pseudo_labels.generator.bg_score": (0.15, "IRN --cam_eval_thres (CDSP thresholds CAMs, value unstated)"),
        "pseudo_labels.generator.lambda_s": (2.0, "CDSP Comparison on ScribbleSup: lambda_s = e^2"),
        "pseudo_labels.generator.lambda_c": (7.0, "CDSP Comparison on ScribbleSup: lambda_c = e^7"),
        "train_seg.model.name": ("deeplab_v3plus", "CDSP Table 1: r101+v3p"),
        "train_seg.model.backbone.name": ("resnet101", "CDSP Table 1: r101+v3p"),
        "train_seg.model.backbone.output_stride": (8, "CDSP deeplabV3p.py: layer3/4 dilated"),
        "train_seg.loss.label_smoothing": (0.1, "CDSP Basic Supervision: epsilon = 0.1"),
        "train_seg.epochs": (50, "CDSP Impl.: 50 epochs"),
        "train_seg.batch_size": (16, "CDSP Impl.: batch size 16"),
        "train_seg.optimizer.lr": (1e-3, "CDSP Impl.: base lr 1e-3"),
        "train_seg.optimizer.momentum": (0.9, "CDSP Impl."),
        "train_seg.optimizer.weight_decay": (5e-4, "CDSP Impl."),
        "train_seg.optimizer.schedule": ("warmup_cosine", "CDSP Impl.: warm-up then cosine to zero"),
        "train_seg.optimizer.warmup_epochs": (10, "CDSP Impl.: over the first 10 epochs"),
        "train_seg.head_lr_multiplier": (1.0, "CDSP train.py: one parameter group"),
        "train_seg.augment.crop_size": (465, "CDSP utils.py Crop([465, 465])"),
        "train_seg.augment.scale_min": (0.5, "CDSP utils.py RandScale([0.5, 2.0])"),
        "train_seg.augment.scale_max": (2.0, "CDSP utils.py RandScale([0.5, 2.0])"),
        "evaluate.scales": ([1.0], "CDSP train.py validate: one forward pass"),
        "evaluate.flip": (False, "CDSP train.py validate"),
        "evaluate.crf": (None, "CDSP: no CRF post-processing"),
    },
    "ktse_seed_voc.yaml": {
        "train_cls.head.name": ("ktse", "KTSE Sec. 3.1: GPP head"),
        "train_cls.backbone.output_stride": (8, "KTSE resnet38d (AEFT): output stride 8"),
        "train_cls.epochs": (40, "KTSE train.py --max_epochs 40"),
        "train_cls.loss.warmup_epochs": (10, "KTSE train.py --T 10"),
        "train_cls.batch_size": (8, "KTSE train.py --batch_size 8"),
        "train_cls.augment.crop_size": (320, "KTSE train.py --crop 320"),
        "train_cls.optimizer.lr": (0.01, "KTSE Sec. 4.1: initial lr 1e-2"),
        "train_cls.optimizer.schedule": ("poly", "KTSE Sec. 4.1: poly"),
        "train_cls.optimizer.poly_power": (0.9, "KTSE Sec. 4.1: power 0.9"),
        "train_cls.optimizer.weight_decay": (5e-4, "KTSE train.py --wt_dec 5e-4"),
        "train_cls.head_lr_multiplier": (10.0, "KTSE model_ktse_plus.py: 10x on scratch layers"),
        "train_cls.loss.beta_h": (0.3, "KTSE Sec. 3.3: beta_h = 0.3"),
        "train_cls.loss.beta_l": (0.15, "KTSE Sec. 3.3: beta_l = 0.15"),
        "train_cls.loss.omega_fg": (0.0125, "KTSE Sec. 3.3: omega_fg = 0.0125"),
        "train_cls.loss.beta_o": (0.2, "KTSE Sec. 3.3: beta_o = 0.2"),
        "train_cls.loss.lambda_inter": (0.005, "KTSE Sec. 3.5: lambda_inter = 0.005"),
        "train_cls.loss.erase_threshold": (0.6, "KTSE Sec. 3.4 / train.py TH[0] 0.6"),
        "pseudo_labels.generator.scales": ([1.0, 0.5, 1.5, 2.0], "AEFT/IRN multi-scale inference"),
        "pseudo_labels.generator.bg_score": (0.15, "IRN's threshold (KTSE takes the best one)"),
    },
    "ktse_voc.yaml": {
        "train_cls.epochs": (40, "KTSE train.py --max_epochs 40 (from ktse_seed_voc.yaml)"),
        "train_cls.augment.crop_size": (320, "KTSE train.py --crop 320 (from ktse_seed_voc.yaml)"),
        "train_seg.model.name": ("deeplab_v2", "KTSE Sec. 4.1: DeeplabV2"),
        "train_seg.model.backbone.name": ("resnet101", "KTSE Sec. 4.1: ResNet101"),
        "train_seg.model.backbone.output_stride": (8, "BECO deeplabv2.json output_stride 8"),
        "train_seg.epochs": (80, "KTSE Sec. 4.1: 80 epochs on VOC"),
        "train_seg.batch_size": (16, "KTSE Sec. 4.1: batch size 16"),
        "train_seg.optimizer.lr": (0.01, "KTSE Sec. 4.1: initial lr 1e-2"),
        "train_seg.optimizer.momentum": (0.9, "KTSE Sec. 4.1"),
        "train_seg.optimizer.weight_decay": (1e-4, "KTSE Sec. 4.1: weight decay 1e-4"),
        "train_seg.optimizer.schedule": ("poly", "KTSE Sec. 4.1: polynomial decay"),
        "train_seg.augment.crop_size": (512, "BECO voc12.json RandomResizedCrop 512"),
        "train_seg.augment.scale_min": (0.5, "BECO voc12.json scale [0.5, 2.0]"),
        "train_seg.augment.scale_max": (2.0, "BECO voc12.json scale [0.5, 2.0]"),
        "evaluate.scales": ([0.5, 0.75, 1.0, 1.25, 1.5], "BECO train_beco.py test_msc scales"),
        "evaluate.crf": (DEEPLAB_V2_CRF, "BECO utils/crf.py DenseCRF defaults"),
    },
    "ktse_coco.yaml": {
        "dataset.format": ("coco", "KTSE Table 5"),
        "dataset.train_split": ("train2014", "KTSE Sec. 4.1: 80k train"),
        "dataset.val_split": ("val2014", "KTSE Sec. 4.1: 40k val"),
        "train_seg.epochs": (40, "KTSE Sec. 4.1: 40 epochs on COCO"),
        "train_seg.batch_size": (16, "KTSE Sec. 4.1: common batch size 16"),
        "train_seg.optimizer.lr": (0.01, "KTSE Sec. 4.1"),
        "train_seg.augment.crop_size": (512, "BECO (from ktse_voc.yaml)"),
        "train_cls.augment.crop_size": (320, "KTSE train.py (from ktse_seed_voc.yaml)"),
    },
    "out_voc.yaml": {
        **IRN_CLASSIFIER,
        "train_seg.model.backbone.name": ("resnet101", "OuT Table 1: OuT^AdvCAM ResNet-101"),
        "train_seg.augment.crop_size": (448, "OuT Sec. 4.1.2: crop 448x448"),
        "train_seg.batch_size": (10, "OuT Sec. 4.1.2: batch size 10"),
        "train_seg.epochs": (19, "OuT Sec. 4.1.2: 20K iterations at batch 10 = 18.9 epochs"),
        "train_seg.optimizer.lr": (1e-3, "OuT Sec. 4.1.2: initial lr 0.001"),
        "train_seg.optimizer.momentum": (0.9, "OuT Sec. 4.1.2"),
        "train_seg.optimizer.weight_decay": (5e-4, "OuT Sec. 4.1.2: weight decay 0.0005"),
        "train_seg.optimizer.schedule": ("poly", "OuT Sec. 4.1.2: polynomial policy"),
        "train_seg.optimizer.poly_power": (0.9, "OuT Sec. 4.1.2: power 0.9"),
        "train_seg.corrector.strategy": ("nnss", "OuT Table 3: NNSS online 65.3, the best"),
        "train_seg.corrector.mode": ("online", "OuT Table 3"),
        "train_seg.corrector.inflection_epoch": (4, "OuT Sec. 4.1.2: the 4 epoch"),
        "train_seg.corrector.confidence": (0.7, "OuT Sec. 4.1.2: confidence threshold 0.7"),
        "train_seg.corrector.ema_decay": (0.999, "OuT Sec. 3.1.2 Eq. 1: v = 0.999"),
        "train_seg.early_learning": (None, "OuT Table 4: techniques do not stack with NNSS"),
        "evaluate.crf": (DEEPLAB_V2_CRF, "OuT Sec. 4.1.2: dense CRF (DeepLab-V2 ResNet-101 set)"),
    },
    "mspn_voc.yaml": {
        **{k: v for k, v in IRN_CLASSIFIER.items() if k != "pseudo_labels.generator.scales"},  # seeds hold scales
        "pseudo_labels.generator.seeds": ([(0.05, 1.0), (0.05, 1.2), (0.10, 1.0), (0.10, 1.2), (0.20, 1.0),
                                           (0.30, 1.2)], "MSPN Table 5 / Sec. 3.3.1: the six seeds"),
        "pseudo_labels.generator.agreement": (6, "MSPN Table 7: t = 6, 72.46"),
        "train_seg.loss.agreement": (6, "MSPN Table 7: t = 6"),
        "train_seg.model.name": ("deeplab_v2", "MSPN Table 7: DeepLabV2"),
        "train_seg.model.backbone.name": ("resnet101", "MSPN Table 7: ResNet101"),
        "train_seg.model.backbone.output_stride": (8, "DeepLab-V2"),
        "train_seg.augment.crop_size": (321, "DeepLab-V2 default (MSPN illegible)"),
        "train_seg.batch_size": (10, "DeepLab-V2 default (MSPN illegible)"),
        "train_seg.epochs": (19, "DeepLab-V2 default 20,000 iterations at batch 10 (MSPN illegible)"),
        "train_seg.optimizer.lr": (2.5e-4, "DeepLab-V2 default (MSPN illegible)"),
        "train_seg.optimizer.poly_power": (0.9, "DeepLab-V2 default"),
        "evaluate.crf": (DEEPLAB_V2_CRF, "DeepLab-V2 test-time CRF"),
    },
    "mspn_coco.yaml": {
        "dataset.format": ("coco", "MSPN abstract: COCO 40.8"),
        "pseudo_labels.generator.agreement": (6, "MSPN Table 7 (from mspn_voc.yaml)"),
        "train_seg.model.name": ("deeplab_v2", "MSPN Table 3: DeepLab-V2 + ResNet101"),
        "train_seg.epochs": (12, "100,000 iterations at batch 10 of 82,081 images (our reading)"),
        "train_seg.batch_size": (10, "DeepLab-V2 default (from mspn_voc.yaml)"),
    },
}

# The papers' numbers each recipe's header names (issue #23's rows).
EXPECTED = {"bana_voc.yaml": "74.6", "cdsp_voc.yaml": "75.9", "ktse_seed_voc.yaml": "67.0", "ktse_voc.yaml": "73.0",
            "ktse_coco.yaml": "45.9", "out_voc.yaml": "70.5", "mspn_voc.yaml": "72.5", "mspn_coco.yaml": "40.8"}


@pytest.fixture
def dummy_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The variables the recipes read, at dummy values (weights declined, local output)."""
    monkeypatch.setenv("VOC_ROOT", str(tmp_path / "VOC2012"))
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    monkeypatch.setenv("RESNET50_WEIGHTS", "none")
    monkeypatch.setenv("RESNET101_WEIGHTS", "none")
    monkeypatch.setenv("WSSS_OUTPUT", str(tmp_path / "out"))
    return tmp_path


def lookup(config: PipelineConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


def same(actual: Any, expected: Any) -> bool:
    """Numbers to float precision (a YAML 2.5e-4 against a transcribed 0.00025), everything else exactly."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return actual == pytest.approx(expected)
    return actual == expected


def recipe_files() -> list[str]:
    return sorted(path.name for path in RECIPES.glob("*.yaml"))


def test_every_recipe_is_transcribed_and_every_row_has_a_recipe() -> None:
    assert recipe_files() == sorted(PAPER) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_matches_the_paper(name: str, dummy_env: Path) -> None:
    config = load_config(RECIPES / name)
    found = {path: lookup(config, path) for path in PAPER[name]}
    wrong = {path: (found[path], value, source) for path, (value, source) in PAPER[name].items()
             if not same(found[path], value)}
    assert not wrong, f"{name}: recipe value, paper value, source: {wrong}"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_reads_paths_from_the_environment(name: str, dummy_env: Path) -> None:
    config = load_config(RECIPES / name)
    root = "coco" if config.dataset.format == "coco" else "VOC2012"
    assert config.dataset.root == str(dummy_env / root)
    assert config.output == str(dummy_env / "out")
    assert config.train_cls.backbone.weights == "none" and config.train_seg.model.backbone.weights == "none"
    assert f" {EXPECTED[name]}" in (RECIPES / name).read_text().split("\nname:")[0]


def imageless_layouts(root: Path) -> None:
    """The folders and lists pre-flight looks for, without images (tests/test_preflight.py does the same)."""
    voc = root / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train_aug", "val"):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("2007_000032\n")
    for folder in ("JPEGImages", "SegmentationClassAug", "Annotations", "Scribbles"):
        (voc / folder).mkdir()
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2014", "val2014"):
        (coco / "annotations" / f"instances_{split}.json").write_text("{}")
        (coco / split).mkdir()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_check_passes(name: str, dummy_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imageless_layouts(dummy_env)
    path = str(RECIPES / name)
    assert main(["config", "check", path, "--offline"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().err.splitlines()[-1] == f"{path}: OK"


def test_crf_presets_are_the_transcribed_sets() -> None:
    assert CRF_PRESETS["bana_stage2"] == BANA_STAGE2_CRF
    assert CRF_PRESETS["deeplab_v2_resnet"] == DEEPLAB_V2_CRF
    assert CRF_PRESETS["psa"] == PSA_CRF
