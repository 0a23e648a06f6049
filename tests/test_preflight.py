"""The pre-flight step: what a config points at is checked before Ray starts, every problem at once, each in two
lines naming the field, the path or URI, what is wrong and what to do.

No test here starts Ray: the autouse ``ray_must_not_start`` makes starting it fail the test, and the CLI test
in a subprocess checks that no Ray session folder was created. The S3 checks run against moto's real server on
loopback (wrong credentials, with moto's IAM check switched on) and against a closed loopback port.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import moto.server as moto_server
import pytest
import ray
import torch
import yaml
from moto import settings as moto_settings

from wsss_ray.cli import main, storage_failure
from wsss_ray.core import storage
from wsss_ray.core.config_base import SegModelConfig
from wsss_ray.core.storage import StorageError
from wsss_ray.models.card import model_card
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.resnet import ResNet

REPO = Path(__file__).resolve().parents[1]
VOC_YAML = str(REPO / "jobs" / "configs" / "voc.yaml")
FIX_ROOT = ("  fix: point dataset.root at the VOC2012 folder (the one holding JPEGImages/ and ImageSets/); "
            "see docs/reproduce.md")


@pytest.fixture(autouse=True)
def ray_must_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting Ray (directly, or through the CLI's init_ray) fails the test."""
    from wsss_ray.core import ray_utils

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started before the pre-flight problems were reported")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray_utils, "init_ray", refuse)


@pytest.fixture
def voc_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """jobs/configs/voc.yaml's variables: weights declined, local output; VOC_ROOT is each test's."""
    monkeypatch.setenv("RESNET50_WEIGHTS", "none")
    monkeypatch.setenv("RESNET101_WEIGHTS", "none")
    monkeypatch.setenv("WSSS_OUTPUT", str(tmp_path / "out"))
    return tmp_path


def voc_folder(root: Path, splits: tuple[str, ...] = ("train_aug", "val"), folders: tuple[str, ...] = (
        "JPEGImages", "SegmentationClassAug")) -> Path:
    """An (imageless) VOC2012 layout: the split lists and folders the checks look for."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in splits:
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("2007_000032\n")
    for folder in folders:
        (root / folder).mkdir()
    return root


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["config", "check", *argv])
    return code, capsys.readouterr().err.splitlines()


def test_missing_dataset_root(voc_env: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VOC_ROOT", "/nonexistent")
    code, lines = check(capsys, VOC_YAML)
    assert code == 2
    assert lines == [f"pre-flight: 1 problem with {VOC_YAML}; nothing was started:",
                     f"{VOC_YAML}: dataset.root: /nonexistent: does not exist", FIX_ROOT]


def test_missing_train_aug_points_at_sbd(voc_env: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = voc_folder(voc_env / "VOC2012", splits=("val",), folders=("JPEGImages",))
    monkeypatch.setenv("VOC_ROOT", str(root))
    code, lines = check(capsys, VOC_YAML)
    assert code == 2
    assert lines == [
        f"pre-flight: 2 problems with {VOC_YAML}; nothing was started:",
        (f"{VOC_YAML}: dataset.train_split: {root}/ImageSets/Segmentation/train_aug.txt: split list 'train_aug' "
        "not found (nor in ImageSets/Main/)"),
        ("  fix: train_aug is SBD's augmented split (10,582 images), not in the VOC 2012 tarball: put train_aug.txt "
        "in ImageSets/Segmentation/ and SBD's masks in SegmentationClassAug/; see docs/reproduce.md"),
        (f"{VOC_YAML}: dataset.train_split: {root}/SegmentationClassAug/: missing: SBD's augmented masks, which "
        "score the train_aug pseudo-masks"),
        ("  fix: unpack SBD's augmented masks as SegmentationClassAug/ into the VOC2012 folder; see "
        "docs/reproduce.md")]


def test_a_complete_voc_folder_passes(voc_env: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VOC_ROOT", str(voc_folder(voc_env / "VOC2012")))
    assert check(capsys, VOC_YAML) == (0, [f"{VOC_YAML}: OK"])


def test_supervision_folders_voc_and_coco(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = voc_folder(tmp_path / "VOC2012", splits=("train", "val"), folders=("JPEGImages",))
    small = "backbone: {name: resnet_tiny}"
    cfg = tmp_path / "scribbles.yaml"
    cfg.write_text(f"output: {tmp_path}/out\ndataset: {{root: {root}, train_split: train, supervision: "
                   f"scribbles}}\ntrain_cls: {{{small}}}\ntrain_seg: {{model: {{{small}}}}}\n")
    code, lines = check(capsys, str(cfg))
    assert code == 2
    assert lines[1:] == [f"{cfg}: dataset.supervision: {root}/Scribbles/: missing: one scribble PNG per image",
                         ("  fix: add the scribble PNGs (ScribbleSup, rendered) as Scribbles/<id>.png; see "
                         "docs/reproduce.md")]
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_val2014.json").write_text("{}")
    (coco / "val2014").mkdir()
    cfg.write_text(f"output: {tmp_path}/out\ndataset: {{format: coco, root: {coco}, train_split: train2014, "
                   f"val_split: val2014}}\ntrain_cls: {{{small}}}\ntrain_seg: {{model: {{{small}}}}}\n")
    code, lines = check(capsys, str(cfg))
    assert code == 2
    assert lines == [
        f"pre-flight: 2 problems with {cfg}; nothing was started:",
        (f"{cfg}: dataset.train_split: {coco}/annotations/instances_train2014.json: annotations of split "
        "'train2014' not found"),
        "  fix: unpack COCO's annotations_trainval archive into annotations/; see docs/reproduce.md",
        f"{cfg}: dataset.train_split: {coco}/train2014/: missing: the train2014 images",
        "  fix: unpack COCO's train2014.zip into train2014/"]


def test_unset_weights_of_a_paper_backbone_stop_the_run(voc_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VOC_ROOT", str(voc_folder(voc_env / "VOC2012")))
    monkeypatch.setenv("RESNET101_WEIGHTS", "")  # unset in effect: voc.yaml reads ${RESNET101_WEIGHTS:-}
    code, lines = check(capsys, VOC_YAML)
    assert code == 2
    assert lines[1:] == [
        f"{VOC_YAML}: train_seg.model.backbone.weights: (not set): ResNet-101 would train from scratch",
        ("  fix: set RESNET101_WEIGHTS (read by jobs/configs) or train_seg.model.backbone.weights to a torchvision "
        "ResNet-101 ImageNet state dict, local or s3://, or set it to `none` to train from scratch on purpose; "
        "see docs/reproduce.md")]


def test_weights_file_missing_unreadable_or_of_another_backbone(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    tiny = tmp_path / "tiny.pt"
    torch.save({"state_dict": ResNet("resnet_tiny").state_dict()}, tiny)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cfg = tmp_path / "cfg.yaml"

    def config(cls_weights: Path, seg_weights: Path) -> str:
        cfg.write_text(f"output: {tmp_path}/out\ndataset: {{root: {tmp_path}/voc, generate: {{}}}}\n"
                       f"train_cls: {{backbone: {{name: resnet_tiny, weights: {cls_weights}}}}}\n"
                       f"train_seg: {{model: {{backbone: {{name: resnet18, weights: {seg_weights}}}}}}}\n")
        return str(cfg)

    code, lines = check(capsys, config(tmp_path / "missing.pt", tiny))
    assert code == 2
    fix = ("  fix: set {var} (read by jobs/configs) or {field} to a torchvision {name} ImageNet state dict, "
           "local or s3://; see docs/reproduce.md")
    cls_fix = fix.format(var="RESNET_TINY_WEIGHTS", field="train_cls.backbone.weights", name="resnet_tiny")
    seg_fix = fix.format(var="RESNET18_WEIGHTS", field="train_seg.model.backbone.weights", name="resnet18")
    assert lines == [
        f"pre-flight: 2 problems with {cfg}; nothing was started:",
        f"{cfg}: train_cls.backbone.weights: {tmp_path}/missing.pt: no such file", cls_fix,
        (f"{cfg}: train_seg.model.backbone.weights: {tiny}: not a resnet18 state dict: 120 tensors expected; 48 "
        "missing (layer1.1.conv1.weight, layer1.1.bn1.weight, layer1.1.bn1.bias, …), 60 of another shape "
        "(conv1.weight, bn1.weight, bn1.bias, …)"), seg_fix]
    code, lines = check(capsys, config(tmp_path / "junk.pt", tiny))
    assert lines[1] == f"{cfg}: train_cls.backbone.weights: {tmp_path}/junk.pt: torch.load cannot read it as " \
                       "tensors (not a file written by torch.save?)"
    torch.save([1, 2], tmp_path / "list.pt")
    code, lines = check(capsys, config(tmp_path / "list.pt", tiny))
    assert lines[1] == f"{cfg}: train_cls.backbone.weights: {tmp_path}/list.pt: not a state dict (a mapping of " \
                       "parameter names to tensors), got list"
    assert check(capsys, config(tiny, tmp_path / "none"))[0] == 2  # a file called "none" is not `none`
    code, lines = check(capsys, config(tiny, Path("none")))
    assert (code, lines) == (0, [f"{cfg}: OK"])


def test_output_that_cannot_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"output: {tmp_path}/file/out\ndataset: {{root: {tmp_path}/voc, generate: {{}}}}\n"
                   "train_cls: {backbone: {name: resnet_tiny}}\ntrain_seg: {model: {backbone: {name: resnet_tiny}}}\n")
    code, lines = check(capsys, str(cfg))
    assert code == 2
    assert lines[1:] == [f"{cfg}: output: {tmp_path}/file/out: cannot be created: {tmp_path}/file is a file",
                         "  fix: choose another output folder"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def authenticating_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on loopback that checks credentials (moto's IAM check on); a bucket ``locked`` exists.
    The AWS variables hold keys it does not know. Yields the endpoint."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="admin",
                 aws_secret_access_key="admin").create_bucket(Bucket="locked")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    try:
        yield endpoint
    finally:
        server.stop()


def s3_config(tmp_path: Path, output: str) -> Path:
    cfg = tmp_path / "s3.yaml"
    cfg.write_text(f"output: {output}\ndataset: {{root: {tmp_path}/voc, generate: {{}}}}\n"
                   "train_cls: {backbone: {name: resnet_tiny}}\ntrain_seg: {model: {backbone: {name: resnet_tiny}}}\n")
    return cfg


def test_s3_output_and_weights_with_wrong_credentials(authenticating_s3: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = s3_config(tmp_path, "s3://locked/wsss/demo")
    cfg.write_text(cfg.read_text().replace("{backbone: {name: resnet_tiny}}",
                                           "{backbone: {name: resnet_tiny, weights: 's3://locked/tiny.pt'}}", 1))
    code, lines = check(capsys, str(cfg))
    assert code == 2
    assert lines[1:3] == [
        (f"{cfg}: train_cls.backbone.weights: s3://locked/tiny.pt: the S3 endpoint {authenticating_s3} "
         "(AWS_ENDPOINT_URL) refused the credentials: ACCESS_DENIED (HeadObject)"),
        ("  fix: set RESNET_TINY_WEIGHTS (read by jobs/configs) or train_cls.backbone.weights to a torchvision "
         "resnet_tiny ImageNet state dict, local or s3://; see docs/reproduce.md")]
    assert lines[3:] == [
        (f"{cfg}: output: s3://locked/wsss/demo: the S3 endpoint {authenticating_s3} (AWS_ENDPOINT_URL) refused the "
        "credentials: The AWS Access Key Id you provided does not exist in our records."),
        ("  fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys) to "
        "keys allowed to list and write there")]


def test_s3_output_on_a_closed_port_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    cfg = s3_config(tmp_path, "s3://my-bucket/wsss/demo")
    code, lines = check(capsys, str(cfg))
    assert code == 2
    assert re.sub(r"after \d+ ms", "after N ms", lines[1]) == (
        f"{cfg}: output: s3://my-bucket/wsss/demo: cannot reach the S3 endpoint http://127.0.0.1:{port} "
        f"(AWS_ENDPOINT_URL): Failed to connect to 127.0.0.1:{port} after N ms: Could not connect to server")
    assert lines[2] == ("  fix: check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network; "
                        "`wsss-ray config check --offline` skips the S3 checks")
    assert check(capsys, str(cfg), "--offline") == (0, [
        "pre-flight: --offline, not checked: output s3://my-bucket/wsss/demo", f"{cfg}: OK"])


def test_s3_output_that_works_leaves_nothing_behind(s3_prefix: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = s3_config(tmp_path, s3_prefix)
    assert check(capsys, str(cfg)) == (0, [f"{cfg}: OK"])
    assert storage.list_files(s3_prefix) == []  # the test object was deleted


def test_every_problem_at_once_and_no_ray_from_the_cli(tmp_path: Path) -> None:
    """``wsss-ray run`` as a user types it: four problems in one run, two lines each, no traceback, and Ray never
    started (its temp folder, where every Ray session lives, stays empty)."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "VOC_ROOT": "/nonexistent", "RESNET50_WEIGHTS": "", "RESNET101_WEIGHTS": "",
           "WSSS_OUTPUT": f"{tmp_path}/file/out", "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    (tmp_path / "file").write_text("x")
    done = subprocess.run([sys.executable, "-m", "wsss_ray.cli", "run", "--config", "jobs/configs/voc.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == "pre-flight: 4 problems with jobs/configs/voc.yaml; nothing was started:"
    assert [line.split(": ")[1] for line in lines[1::2]] == [
        "dataset.root", "train_cls.backbone.weights", "train_seg.model.backbone.weights", "output"]
    assert len(lines) == 9 and all(line.startswith("  fix: ") for line in lines[2::2])
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert list(ray_tmp.iterdir()) == []


def tiny_model(folder: Path) -> Path:
    config = SegModelConfig.model_validate({"backbone": {"name": "resnet_tiny"}, "aspp_channels": 8})
    folder.mkdir(parents=True)
    torch.save(build_segmentation_model(config, 3).state_dict(), folder / "model.pt")
    storage.write_json(str(folder / "model.json"), model_card(config, ["background", "a", "b"]))
    return folder


def test_predict_preflight_names_model_input_and_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["predict", "--model", str(tmp_path / "nothing"), "--input", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "pred")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert lines == [
        "pre-flight: 2 problems with predict; nothing was started:",
        (f"predict: --model: {tmp_path}/nothing: no weights at {tmp_path}/nothing/model.pt (expected a train_seg-* "
        "stage folder or its model.pt)"),
        "  fix: give a train_seg-* stage folder (or its model.pt) with model.json beside it, local or s3://",
        (f"predict: --input: {tmp_path}/empty: no images found (suffixes .jpg, .jpeg, .png, .bmp, .gif, .tif, "
        ".tiff, .webp, .ppm, .pgm, .pnm)"),
        "  fix: give a folder, prefix, glob or .txt list of images"]


def test_predict_preflight_refuses_an_out_of_another_model(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model(tmp_path / "train_seg-x")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    out = tmp_path / "pred"
    options = {"scales": [1.0], "flip": False, "crf": None, "overlay": False, "max_side": 1024, "min_size": 64}
    storage.write_json(str(out / "predict.json"), {"model_sha256": "0" * 64, "options": options})
    code = main(["predict", "--model", str(model), "--input", str(tmp_path / "images"), "--out", str(out),
                 "--crf"])
    lines = capsys.readouterr().err.splitlines()
    sha = hashlib.sha256((model / "model.pt").read_bytes()).hexdigest()
    assert code == 2
    assert lines == [
        "pre-flight: 1 problem with predict; nothing was started:",
        (f"predict: --out: {out}: its masks come from another run: model sha256 000000000000… → {sha[:12]}…, "
        "crf off → on"),
        "  fix: give another --out, or --overwrite to delete its masks and start clean"]


def test_storage_error_mid_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A store that stops answering where no pre-flight looked first (here: export reading its model from a
    closed port): one line naming the URI and the cause, and that a rerun resumes; no traceback."""
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WSSS_S3_RETRIES", "1")
    code = main(["export", "--model", "s3://bucket/train_seg-x", "--out", str(tmp_path / "export"), "--no-onnx"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.sub(r"after \d+ ms", "after N ms", err).splitlines() == [
        ("export: storage error: s3://bucket/train_seg-x/model.pt: cannot stat (When getting information for key "
        "'train_seg-x/model.pt' in bucket 'bucket': AWS Error NETWORK_CONNECTION during HeadObject operation: "
        f"curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1:{port} after N ms: "
        "Could not connect to server)"),
        "Finished work is kept; a rerun resumes."]  # export has no --verbose; run, stages, sweep, predict do


def test_storage_failure_is_found_behind_rays_wrappers() -> None:
    cause = StorageError("s3://b/x/_SUCCESS.json: cannot stat (AWS Error NETWORK_CONNECTION)")
    wrapped = ray.exceptions.RayTaskError("work", "Traceback ...\nStorageError: ...", cause).as_instanceof_cause()
    assert storage_failure(wrapped) == str(cause)
    try:
        try:
            raise cause
        except StorageError as error:
            raise RuntimeError("the stage failed") from error
    except RuntimeError as error:
        assert storage_failure(error) == str(cause)
    text = RuntimeError("Training failed:\n  ...\nwsss_ray.core.storage.StorageError: s3://b/ckpt: cannot write (x)")
    assert storage_failure(text) == "s3://b/ckpt: cannot write (x)"
    assert storage_failure(ValueError("a bug")) is None


def test_stage_commands_and_sweeps_check_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A stage command and a sweep (through its base config, with --set) stop at the same problems as ``run``."""
    monkeypatch.setenv("WSSS_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("WSSS_DATA", "/nonexistent")
    demo = str(REPO / "jobs" / "configs" / "demo.yaml")
    assert main(["train-cls", "--config", demo, "--set", "dataset.generate=null"]) == 2
    assert capsys.readouterr().err.splitlines()[1] == f"{demo}: dataset.root: /nonexistent: does not exist"
    space = tmp_path / "space.yaml"
    space.write_text(f"name: s\nbase_config: {demo}\ntrial: train_seg\nmetric: val_miou\nmode: max\n"
                     "params:\n  train_seg.loss.label_smoothing: {grid: [0.0, 0.1]}\n")
    assert main(["sweep", "--space", str(space), "--set", "dataset.generate=null"]) == 2
    assert capsys.readouterr().err.splitlines()[:2] == [
        f"pre-flight: 1 problem with {space}; nothing was started:",
        f"{space}: dataset.root: /nonexistent: does not exist"]


def test_predict_model_on_an_unreachable_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["predict", "--model", "s3://models/train_seg-x", "--input", str(tmp_path), "--out",
                 str(tmp_path / "pred")]) == 2
    lines = [re.sub(r"after \d+ ms", "after N ms", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "pre-flight: 1 problem with predict; nothing was started:",
        (f"predict: --model: s3://models/train_seg-x: cannot reach the S3 endpoint http://127.0.0.1:{port} "
        f"(AWS_ENDPOINT_URL): Failed to connect to 127.0.0.1:{port} after N ms: Could not connect to server"),
        ("  fix: check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network; `wsss-ray config check "
        "--offline` skips the S3 checks")]


def test_a_new_check_is_one_function_in_the_list(tmp_path: Path) -> None:
    """How the GPU check (issue 22) joins: a function ``(config, options) -> problems`` in CONFIG_CHECKS. A check
    that fails on a bug of its own becomes one problem; the others still report theirs."""
    from wsss_ray.pipeline_config import parse_config
    from wsss_ray.preflight import CONFIG_CHECKS, PreflightOptions, Problem, format_report, preflight

    config = parse_config({"output": str(tmp_path / "out"), "dataset": {"root": "/nonexistent"},
                           "train_cls": {"backbone": {"name": "resnet_tiny"}},
                           "train_seg": {"model": {"backbone": {"name": "resnet_tiny"}}}})

    def check_gpus(config: object, options: PreflightOptions) -> list[Problem]:
        return [Problem("train_seg.workers.use_gpu", "the cluster", "2 GPUs asked for, 0 there", "set use_gpu: false")]

    def broken(config: object, options: PreflightOptions) -> list[Problem]:
        raise KeyError("GPU")

    report = preflight(config, checks=[*CONFIG_CHECKS, check_gpus, broken])
    lines = format_report(report, "cfg.yaml").splitlines()
    assert [line.split(": ")[1] for line in lines[1::2]] == ["dataset.root", "train_seg.workers.use_gpu",
                                                             "<pre-flight>"]
    assert lines[5].startswith("cfg.yaml: <pre-flight>: broken: the check itself failed: KeyError: 'GPU' "
                               "(test_preflight.py:")


def gpu_config(tmp_path: Path, **sections: Any) -> Path:
    """demo.yaml with a local output and the given sections merged in."""
    tmp_path.mkdir(parents=True)
    path = tmp_path / "gpus.yaml"
    body = {"base": str(REPO / "jobs" / "configs" / "demo.yaml"), "output": str(tmp_path / "out"),
            "dataset": {"root": str(tmp_path / "voc")}, **sections}
    path.write_text(yaml.safe_dump(body))
    voc_folder(tmp_path / "voc", splits=("train", "val"), folders=("JPEGImages", "SegmentationClass"))
    return path


@pytest.mark.parametrize("gpus", [0, 1])
def test_gpus_a_config_asks_for_against_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], gpus: int) -> None:
    """use_gpu: true that could never be placed is reported before Ray starts (the stages' own sizing rule, with
    the GPUs this machine has); use_gpu: auto is sized down by the stages, so it passes."""
    from wsss_ray.preflight import gpus as gpu_check

    monkeypatch.setattr(gpu_check, "local_gpus", lambda: gpus)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("WSSS_AUTOSCALING", raising=False)
    auto = gpu_config(tmp_path / "auto", train_cls={"workers": {"num_workers": 2, "use_gpu": "auto"}})
    assert check(capsys, str(auto)) == (0, [f"{auto}: OK"])
    asks = gpu_config(tmp_path / "true", train_cls={"workers": {"num_workers": 2, "use_gpu": True}},
                      pseudo_labels={"use_gpu": True})
    code, lines = check(capsys, str(asks))
    assert code == 2
    seen = f"the cluster has {gpus} GPU{'' if gpus == 1 else 's'}"
    expected = [
        (f"{asks}: train_cls.workers.use_gpu: this machine: true asks for 2 GPU worker(s) (train_cls.workers."
        f"num_workers: 2, one GPU each) but {seen} and no autoscaler (ray.autoscaling: false): the group could "
        "never be placed"),
        (f"  fix: Set train_cls.workers.num_workers to at most {gpus}, or train_cls.workers.use_gpu: auto to use the "
        "GPUs there are")]
    if gpus == 0:  # one GPU is enough for a pool
        expected += [
            (f"{asks}: pseudo_labels.use_gpu: this machine: true needs a GPU but {seen} and no autoscaler "
            "(ray.autoscaling: false): the actors could never start"),
            "  fix: Set pseudo_labels.use_gpu: auto"]
    count = len(expected) // 2
    assert lines == [f"pre-flight: {count} problem{'s' * (count > 1)} with {asks}; nothing was started:", *expected]
    # An autoscaler adds GPU nodes: the same config then waits for them instead.
    monkeypatch.setenv("WSSS_AUTOSCALING", "1")
    assert check(capsys, str(asks)) == (0, [f"{asks}: OK"])


def test_predict_gpu_yes_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from wsss_ray.preflight import gpus as gpu_check

    monkeypatch.setattr(gpu_check, "local_gpus", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("WSSS_AUTOSCALING", raising=False)
    model = tiny_model(tmp_path / "train_seg-x")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    code = main(["predict", "--model", str(model), "--input", str(tmp_path / "images"), "--out",
                 str(tmp_path / "pred"), "--gpu", "yes"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "pre-flight: 1 problem with predict; nothing was started:",
        ("predict: wsss-ray predict --gpu: this machine: true needs a GPU but the cluster has 0 GPUs and no "
        "autoscaler (ray.autoscaling: false): the actors could never start"),
        "  fix: Use wsss-ray predict --gpu auto"]
