"""Config validation: every shipped config is valid; bad values name the file and the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsss_ray.cli import main
from wsss_ray.pipeline_config import ConfigError, PipelineConfig, config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "output: out\ndataset:\n  root: data\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "voc.yaml", "coco.yaml"])
def test_shipped_configs_validate(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOC_ROOT", "/data/voc")
    monkeypatch.setenv("COCO_ROOT", "s3://bucket/coco")
    config = load_config(ROOT / "jobs" / "configs" / name)
    assert isinstance(config, PipelineConfig)


def test_defaults_come_from_the_papers(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.train_seg.optimizer.lr == 1e-3 and config.train_seg.optimizer.momentum == 0.9  # OuT
    assert config.train_seg.optimizer.weight_decay == 5e-4 and config.train_seg.optimizer.poly_power == 0.9
    crf = config.pseudo_labels.generator.crf
    assert (crf.gaussian_sxy, crf.gaussian_compat, crf.bilateral_srgb, crf.bilateral_compat, crf.iterations) == (
        3, 3, 13, 10, 10)
    assert config.dataset.train_split == "train_aug"


def test_wrong_type_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train_seg:\n  loss:\n    label_smoothing: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "train_seg.loss.label_smoothing" in message
    assert '"x"' in message


def test_out_of_range_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train_seg\.loss\.label_smoothing: Input should be less than 1, got 1.5"):
        load_config(write(tmp_path, MINIMAL + "train_seg:\n  loss:\n    label_smoothing: 1.5\n"))


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train_cls\.epocs: unknown field"):
        load_config(write(tmp_path, MINIMAL + "train_cls:\n  epocs: 3\n"))


def test_unknown_component_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train_seg\.loss\.name"):
        load_config(write(tmp_path, MINIMAL + "train_seg:\n  loss: {name: focal}\n"))


def test_missing_required_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset: Field required"):
        load_config(write(tmp_path, "output: out\n"))


def test_cross_field_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scale_min"):
        load_config(write(tmp_path, MINIMAL + "train_seg:\n  augment: {scale_min: 2.0, scale_max: 1.0}\n"))


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "output: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_env_parameters_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "output: ${OUT_URI:-local/out}\ndataset:\n  root: ${DATA_ROOT}\n")
    monkeypatch.setenv("DATA_ROOT", "s3://bucket/voc")
    config = load_config(path, ["train_seg.epochs=3", "evaluate.scales=[0.5, 1.0]"])
    assert config.output == "local/out" and config.dataset.root == "s3://bucket/voc"
    assert config.train_seg.epochs == 3 and config.evaluate.scales == [0.5, 1.0]
    monkeypatch.delenv("DATA_ROOT")
    with pytest.raises(ConfigError, match="dataset.root: environment variable DATA_ROOT is not set"):
        load_config(path)


def test_config_hash_tracks_changes(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, MINIMAL))
    b = load_config(write(tmp_path, MINIMAL), ["train_seg.epochs=3"])
    assert config_hash(a.train_seg) == config_hash(load_config(write(tmp_path, MINIMAL)).train_seg)
    assert config_hash(a.train_seg) != config_hash(b.train_seg)


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What the config points at must exist too (the pre-flight step, tests/test_preflight.py): a dataset generated
    # on first use, and the default ResNet-50/101 declared to train from scratch.
    ready = (f"output: {tmp_path}/out\ndataset: {{root: {tmp_path}/voc, generate: {{}}}}\n"
             "train_cls: {backbone: {weights: none}}\ntrain_seg: {model: {backbone: {weights: none}}}\n")
    assert main(["config", "check", str(write(tmp_path, ready))]) == 0
    assert main(["config", "check", str(write(tmp_path, MINIMAL + "ray: {num_cpus: 0}\n"))]) == 2
    err = capsys.readouterr().err
    assert "ray.num_cpus" in err and "greater than or equal to 1" in err


def test_base_config_is_merged_under_the_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(MINIMAL + "train_seg:\n  epochs: 7\n  loss: {label_smoothing: 0.1}\n"
                                        "pseudo_labels:\n  generator: {name: image_cam, bg_score: 0.3}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndataset: {supervision: boxes}\ntrain_seg:\n  batch_size: 6\n"
                                         "pseudo_labels:\n  generator: {name: box}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train_seg.epochs, config.train_seg.batch_size) == (7, 6)  # merged key by key
    assert config.train_seg.loss.label_smoothing == 0.1  # type: ignore[union-attr]
    # Another component replaces the base's section (bg_score means nothing to the box generator).
    assert config.pseudo_labels.generator.name == "box"
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_method_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    names = {path.name: load_config(path) for path in sorted(root.glob("demo*.yaml"))}
    assert names["demo_boxes.yaml"].train_seg.loss.name == "nal"
    assert names["demo_boxes.yaml"].train_cls.head.name == "bap"
    assert names["demo_scribbles.yaml"].train_seg.model.name == "deeplab_v3plus"
    assert names["demo_mspn.yaml"].pseudo_labels.generator.name == "multi_seed"
    assert names["demo_out.yaml"].train_seg.corrector is not None
    assert names["demo_ktse.yaml"].train_cls.loss.name == "ktse"


_MINIMAL = "output: out\ndataset: {root: data}\n"


def test_segmenter_classifier_follows_the_loss(tmp_path: Path) -> None:
    boxes = ("output: out\ndataset: {root: data, supervision: boxes}\npseudo_labels: {generator: {name: box}}\n"
             "train_seg:\n  loss: {name: nal}\n")
    nal = load_config(write(tmp_path, boxes))
    assert nal.train_seg.model.classifier == "cosine" and nal.train_seg.model.cosine_scale == 20.0
    assert nal.train_seg.loss.detach_sigma is False  # type: ignore[union-attr]
    explicit = load_config(write(tmp_path, boxes), ["train_seg.model.classifier=conv"])
    assert explicit.train_seg.model.classifier == "conv"
    # A dump reads back to the same config (the conv choice of a NAL run is written out).
    again = PipelineConfig.model_validate(explicit.model_dump(mode="json"))
    assert again.train_seg.model.classifier == "conv"
    assert load_config(write(tmp_path, _MINIMAL)).train_seg.model.classifier == "conv"
    assert load_config(write(tmp_path, _MINIMAL), ["train_seg.model.classifier=auto"]).train_seg.model.classifier \
        == "conv"


def test_new_model_fields_keep_old_stage_keys(tmp_path: Path) -> None:
    # The classifier fields are left out of the stage key at conv/20.0, so a config from before them keeps its key.
    from wsss_ray.core.config_base import key_dump

    config = load_config(write(tmp_path, _MINIMAL))
    assert config.train_seg.model_dump(mode="json")["model"]["classifier"] == "conv"  # a dump shows everything
    keyed = key_dump(config.train_seg)
    assert "classifier" not in keyed["model"] and "cosine_scale" not in keyed["model"]
    cosine = load_config(write(tmp_path, _MINIMAL), ["train_seg.model.classifier=cosine"])
    assert cosine.train_seg.model_dump(mode="json")["model"]["classifier"] == "cosine"
    assert config_hash(cosine.train_seg) != config_hash(config.train_seg)


def test_options_added_at_their_former_value_keep_old_stage_keys() -> None:
    """MSPN's term_mean at own_set, KTSE's label_norm at min_max and gpp_channels at all reproduce the models
    trained before these options: left out of the key. The new KTSE defaults change the models, so the key."""
    from wsss_ray.core.config_base import key_dump
    from wsss_ray.methods.ktse.config import KtseHeadConfig, KtseLossConfig
    from wsss_ray.methods.mspn.config import MspnLossConfig

    assert "term_mean" not in key_dump(MspnLossConfig())
    assert key_dump(MspnLossConfig(term_mean="labelled_pixels"))["term_mean"] == "labelled_pixels"
    assert "label_norm" not in key_dump(KtseLossConfig(label_norm="min_max"))
    assert key_dump(KtseLossConfig())["label_norm"] == "max"
    assert "gpp_channels" not in key_dump(KtseHeadConfig(gpp_channels="all"))
    assert key_dump(KtseHeadConfig())["gpp_channels"] == "foreground"


def test_crf_defaults_and_presets(tmp_path: Path) -> None:
    def crf_tuple(crf: object) -> tuple[float, ...]:
        return tuple(getattr(crf, k) for k in ("iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy",
                                                "bilateral_srgb", "bilateral_compat"))

    config = load_config(write(tmp_path, _MINIMAL))
    # CAM generators: PSA (tool/imutils.py crf_inference: Gaussian 3/3, bilateral 80/13/10, 10 iterations).
    assert crf_tuple(config.pseudo_labels.generator.crf) == (10, 3, 3, 80, 13, 10)
    assert config.evaluate.crf is None  # no post-processing unless asked for
    # evaluate.crf: {} → DeepLab-v2 ResNet (voc12.yaml / BANA stage3_res.yml: bilateral 4/67/3, Gaussian 3/1).
    enabled = load_config(write(tmp_path, _MINIMAL + "evaluate: {crf: {}}\n"))
    assert crf_tuple(enabled.evaluate.crf) == (10, 1, 3, 67, 3, 4)
    irn = load_config(write(tmp_path, _MINIMAL + "evaluate: {crf: {preset: irn, iterations: 5}}\n"))
    assert crf_tuple(irn.evaluate.crf) == (5, 3, 3, 50, 5, 10)
    vgg = load_config(write(tmp_path, _MINIMAL + "pseudo_labels: {generator: {crf: {preset: deeplab_v1_vgg}}}\n"))
    assert crf_tuple(vgg.pseudo_labels.generator.crf) == (10, 3, 3, 121, 5, 4)
    partial = load_config(write(tmp_path, _MINIMAL + "pseudo_labels: {generator: {crf: {bilateral_sxy: 30}}}\n"))
    assert crf_tuple(partial.pseudo_labels.generator.crf) == (10, 3, 3, 30, 13, 10)
    with pytest.raises(ConfigError, match=r"cfg.yaml: evaluate.crf: .*unknown CRF preset 'nope'"):
        load_config(write(tmp_path, _MINIMAL + "evaluate: {crf: {preset: nope}}\n"))
