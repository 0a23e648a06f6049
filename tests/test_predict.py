"""``wsss-ray predict`` and ``wsss-ray export`` on a tiny trained DeepLab, on the local Ray cluster and S3.

One model is trained once for the module (on the toy data's ground-truth masks: one short Ray Train fit, no
classifier or pseudo-labels, which these tests do not need) and scored by the evaluate stage's own function.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from wsss_ray.cli import main
from wsss_ray.core import storage
from wsss_ray.core.config_base import CrfConfig, DatasetConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES, voc_palette
from wsss_ray.data.image_io import decode_photo, read_image, read_label
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.maths.inference import multiscale_probabilities
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.pipeline_config import EvaluateConfig, SegTrainConfig
from wsss_ray.stages.evaluate import crf_postprocess, evaluate_segmentation
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.predict import (
    PredictOptions,
    ensure_model_card,
    output_names,
    predict_images,
    resolve_inputs,
    resolve_model,
)
from wsss_ray.stages.train_seg import train_segmentation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("predict")
    make_toy_dataset(str(root / "voc"), num_train=8, num_val=4, image_size=64, num_classes=3, seed=5)
    ingest = StageDir.create(str(root / "out"), "ingest", "toy")
    build_manifest(DatasetConfig(root=str(root / "voc"), train_split="train", val_split="val"), ingest)
    train = load_manifest(ingest, "train")
    val = load_manifest(ingest, "val")
    records = [{"image_id": r["image_id"], "image_uri": r["image_uri"], "label_uri": r["mask_uri"],
                "scribble_uri": None, "label_list": [0, *r["tags"]]} for r in train]
    config = SegTrainConfig.model_validate({
        "model": {"backbone": {"name": "resnet_tiny", "output_stride": 16}, "aspp_channels": 16},
        "epochs": 6, "batch_size": 4, "val_every": 0,
        "augment": {"crop_size": 64, "scale_min": 0.9, "scale_max": 1.1},
        "workers": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0, "use_gpu": False}})
    stage = StageDir.create(str(root / "out"), "train_seg", "toy")
    summary = train_segmentation(records, stage, config, len(VOC_CLASSES), class_names=VOC_CLASSES)
    # The stage writes model.json itself (before the caller's _SUCCESS.json); the stage key's hash is unchanged.
    assert summary["model_card_uri"] == stage.path("model.json") and storage.exists(summary["model_card_uri"])
    evaluate = StageDir.create(str(root / "out"), "evaluate", "toy")
    result = evaluate_segmentation(val, evaluate, model_uri=summary["model_uri"], model_config=config.model,
                                   config=EvaluateConfig(scales=[1.0], flip=True), num_classes=len(VOC_CLASSES),
                                   class_names=VOC_CLASSES, score_split="val", use_gpu=False)
    return {"root": root, "stage": stage, "val": val, "evaluate": evaluate, "result": result}


def _rows(out: str) -> dict[str, dict[str, Any]]:
    table = storage.read_parquet(storage.join(out, "predictions.parquet")).to_pylist()
    return {row["image"].rsplit("/", 1)[-1]: row for row in table}


def test_predict_equals_evaluate_on_toy_val(trained: dict[str, Any], tmp_path: Path) -> None:
    listing = tmp_path / "val.txt"
    listing.write_text("# the toy val images\n" + "\n".join(r["image_uri"] for r in trained["val"]) + "\n")
    out = str(tmp_path / "pred")
    summary = predict_images(str(trained["stage"].path("model.pt")), str(listing), out,
                             options=PredictOptions(scales=(1.0,), flip=True), use_gpu=False)
    assert summary["predicted"] == len(trained["val"]) and summary["failed"] == 0
    cm = ConfusionMatrix(len(VOC_CLASSES))
    rows = _rows(out)
    for record in trained["val"]:
        name = record["image_id"]
        mask_uri = storage.join(out, "masks", f"{name}.png")
        # The very bytes the evaluate stage wrote: same decode, same forward pass, same PNG encoding.
        assert storage.read_bytes(mask_uri) == storage.read_bytes(trained["evaluate"].path("predictions",
                                                                                         f"{name}.png"))
        mask = read_label(mask_uri)
        cm.update(read_label(record["mask_uri"]), mask)
        row = rows[f"{name}.jpg"]
        assert (row["height"], row["width"]) == mask.shape and row["failure"] is None
        assert row["class_ids"] == sorted(np.unique(mask).tolist())
        assert row["classes"] == [VOC_CLASSES[c] for c in row["class_ids"]]
    miou = cm.to_dict(VOC_CLASSES)["miou"]
    assert miou == trained["result"]["scores"]["miou"]
    assert miou > 0.0  # a model that gets some class right, so the equality compares something
    print(f"toy val mIoU: predict {miou!r}, evaluate {trained['result']['scores']['miou']!r}")
    assert Image.open(mask_uri).getpalette()[:12] == voc_palette()[:12]


def _save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def odd_inputs(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Writes the odd files; returns each name's displayed (H, W), or None where a failure row is expected."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise for display, so 40 wide × 24 high shows as 24 × 40
    gray16 = Image.fromarray((rng.integers(0, 65535, (30, 20))).astype(np.uint16))
    palette = Image.fromarray(rng.integers(0, 4, (33, 17), dtype=np.uint8), mode="P")
    palette.putpalette(voc_palette())
    files = {
        "gray.png": (_save(rgb.convert("L"), "PNG"), (24, 40)),
        "cmyk.jpg": (_save(rgb.convert("CMYK"), "JPEG"), (24, 40)),
        "gray16.png": (_save(gray16, "PNG"), (30, 20)),
        "rgba.png": (_save(rgb.convert("RGBA"), "PNG"), (24, 40)),
        "palette.png": (_save(palette, "PNG"), (33, 17)),
        "rotated.jpg": (_save(rgb, "JPEG", exif=exif.tobytes()), (40, 24)),
        "tiny.png": (_save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), (1, 1)),
        "big.jpg": (_save(Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).resize(
            (4000, 3000)), "JPEG", quality=70), (3000, 4000)),
        "truncated.jpg": (_save(rgb, "JPEG")[:150], None),
        "empty.png": (b"", None),
        "text.jpg": (b"this is not a picture\n", None),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.md").write_text("not an image suffix: not listed")
    return {name: size for name, (_, size) in files.items()}


def test_odd_inputs_give_a_mask_or_a_failure_row_and_a_rerun_skips(trained: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    images = tmp_path / "odd"
    images.mkdir()
    expected = odd_inputs(images)
    assert decode_photo((images / "rotated.jpg").read_bytes(), "rotated.jpg").shape == (40, 24, 3)
    out = tmp_path / "pred"
    argv = ["predict", "--model", trained["stage"].uri, "--input", str(images), "--out", str(out), "--overlay",
            "--gpu", "no"]
    assert main(argv) == 0
    rows = _rows(str(out))
    assert set(rows) == set(expected)
    for name, size in expected.items():
        row = rows[name]
        if size is None:
            assert row["failure"] and name in row["failure"] and row["mask"] is None, row
            assert not (out / "masks" / f"{Path(name).stem}.png").exists()
        else:
            assert row["failure"] is None, row
            mask = read_label(str(out / "masks" / f"{Path(name).stem}.png"))
            assert mask.shape == size == (row["height"], row["width"]), name
            assert np.asarray(Image.open(out / "overlays" / f"{Path(name).stem}.jpg")).shape == (*size, 3)
    assert "empty file" in rows["empty.png"]["failure"]
    # parquet readable by plain pyarrow: the table other tools read
    assert pq.read_table(out / "predictions.parquet").num_rows == len(expected)

    masks = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    good = sum(size is not None for size in expected.values())
    assert summary["skipped_done"] == good and summary["predicted"] == good
    assert summary["failed"] == len(expected) - good  # failures are retried (they may have been transient)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == masks


def test_predict_on_s3_with_crf(trained: dict[str, Any], s3_prefix: str, tmp_path: Path) -> None:
    model = storage.join(s3_prefix, "train_seg-toy")
    for name in ("model.pt", "model.json"):
        storage.write_bytes(storage.join(model, name), storage.read_bytes(trained["stage"].path(name)))
    for record in trained["val"][:2]:
        storage.write_bytes(storage.join(s3_prefix, "photos", f"{record['image_id']}.jpg"),
                            storage.read_bytes(record["image_uri"]))
    storage.write_bytes(storage.join(s3_prefix, "photos", "sub", "tiny.png"),
                        _save(Image.new("RGB", (1, 1), (10, 200, 10)), "PNG"))
    storage.write_bytes(storage.join(s3_prefix, "photos", "broken.jpg"), b"\xff\xd8\xff")
    crf = CrfConfig(iterations=3)
    summary = predict_images(model, storage.join(s3_prefix, "photos") + "/", None,
                             options=PredictOptions(crf=crf), use_gpu=False)
    out = summary["out"]
    assert out.startswith(s3_prefix + "/predict-")  # default: beside the model's stage folder
    assert (summary["predicted"], summary["failed"]) == (3, 1)
    assert "broken.jpg" in summary["failures"][0]
    net = resolve_model(model).build()
    for record in trained["val"][:2]:
        image = read_image(record["image_uri"])
        probs = multiscale_probabilities(net, image, [1.0], False)
        expected = crf_postprocess(image, probs, crf)
        got = read_label(storage.join(out, "masks", f"{record['image_id']}.png"))
        # float16 transport of the probabilities may flip a near-tie pixel; nothing more.
        assert got.shape == expected.shape and (got != expected).mean() < 0.01
    assert read_label(storage.join(out, "masks", "sub", "tiny.png")).shape == (1, 1)


def test_inputs_globs_lists_and_names(tmp_path: Path) -> None:
    for rel in ("a/x.jpg", "a/x.png", "a/b/y.JPG", "a/readme.txt", "c/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    uris, root = resolve_inputs(str(tmp_path / "a"))
    assert [u[len(root) + 1:] for u in uris] == ["b/y.JPG", "x.jpg", "x.png"]
    assert output_names(uris, root) == ["b/y", "x_jpg", "x_png"]
    uris, root = resolve_inputs(str(tmp_path / "*" / "*.png"))
    assert uris == [str(tmp_path / "a" / "x.png"), str(tmp_path / "c" / "z.png")] and root == str(tmp_path)
    (tmp_path / "list.txt").write_text("a/x.jpg\n\n# skipped\nc/z.png\n")
    uris, root = resolve_inputs(str(tmp_path / "list.txt"))
    assert uris == [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "c" / "z.png")]
    assert output_names(uris, root) == ["a/x", "c/z"]


def test_model_without_card_is_refused_by_name_and_backfilled(trained: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(storage.read_bytes(trained["stage"].path("model.pt")))
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        resolve_model(str(tmp_path))
    (tmp_path / "_SUCCESS.json").write_text("{}")  # a stage folder completed before train_seg wrote the card
    config = SegTrainConfig.model_validate({"model": {"backbone": {"name": "resnet_tiny", "output_stride": 16},
                                                      "aspp_channels": 16}})
    ensure_model_card(str(tmp_path), config.model, VOC_CLASSES)  # the pipeline's backfill
    assert resolve_model(str(tmp_path)).card["classes"] == VOC_CLASSES
    (tmp_path / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        resolve_model(str(tmp_path / "nothing"))
    assert main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "export")]) == 2


CLEAN_LOAD = """
import json, sys
import numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[2]))
out = {"torchscript": torch.jit.load(sys.argv[1] + "/model.torchscript.pt")(x).detach().numpy()}
try:
    import onnxruntime
except ImportError:
    pass
else:
    session = onnxruntime.InferenceSession(sys.argv[1] + "/model.onnx")
    out["onnx"] = session.run(["logits"], {"images": x.numpy()})[0]
np.savez(sys.argv[3], **out)
assert "wsss_ray" not in sys.modules, "the exported model must load without wsss_ray"
print(json.load(open(sys.argv[1] + "/model.json"))["input"]["layout"])
"""


def test_export_round_trips_without_wsss_ray(trained: dict[str, Any], tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", "--model", trained["stage"].uri, "--out", str(out)]) == 0
    # Quiet: the written files as JSON on stdout, one line on stderr; not the exporters' ~20 lines of warnings,
    # progress prints and log lines.
    printed = capfd.readouterr()
    assert [str(w.message) for w in caught] == []
    assert set(json.loads(printed.out)) >= {"torchscript", "card"}
    assert [line for line in printed.err.splitlines() if not line.startswith("[20")] == [
        line for line in printed.err.splitlines() if line.startswith("[export] ")]  # (Ray's own lines aside)
    card = json.loads((out / "model.json").read_text())
    assert card["classes"] == VOC_CLASSES and card["input"]["height"] == "dynamic"
    assert card["normalization"]["mean"] == [0.485, 0.456, 0.406]
    # A size the trace never saw: height and width are dynamic in both exports.
    x = torch.randn(1, 3, 45, 70)
    np.save(tmp_path / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(out), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "NCHW"
    with torch.no_grad():
        expected = resolve_model(trained["stage"].uri).build()(x).numpy()
    results = np.load(tmp_path / "y.npz")
    assert set(results.files) == ({"torchscript", "onnx"} if card["files"]["onnx"] else {"torchscript"})
    for name in results.files:
        np.testing.assert_allclose(results[name], expected, atol=1e-5, rtol=0, err_msg=name)


def test_predict_rayjob_runs_the_cli_with_the_shared_cluster() -> None:
    import shlex

    import yaml

    from wsss_ray.cli import build_parser

    cluster = Path(__file__).resolve().parent.parent / "cluster"
    job = yaml.safe_load((cluster / "rayjob-predict.yaml").read_text())
    assert job["spec"]["rayClusterSpec"] == yaml.safe_load((cluster / "raycluster.yaml").read_text())["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    python, script, *args = shlex.split(job["spec"]["entrypoint"])
    assert (python, script) == ("python", "jobs/predict.py")
    parsed = build_parser().parse_args(["predict", *args])  # exits (fails) on an option the CLI does not take
    assert parsed.model.startswith("s3://") and parsed.input.startswith("s3://") and parsed.out.startswith("s3://")


def test_crf_rerun_into_the_same_out_refuses_or_starts_clean(trained: dict[str, Any], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A --crf run into an --out that holds masks without CRF: refused (the folder keeps its masks and its
    predict.json), or with --overwrite CRF masks for every image, as a fresh folder gets. predict.json always
    describes the masks present; a rerun with the same model and options resumes."""
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join(r["image_uri"] for r in trained["val"]) + "\n")
    out = tmp_path / "pred"
    command = ["predict", "--model", trained["stage"].uri, "--input", str(listing), "--gpu", "no"]

    def masks(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "masks").rglob("*.png"))}

    def recorded_crf(folder: Path) -> Any:
        return json.loads((folder / "predict.json").read_text())["options"]["crf"]

    assert main([*command, "--out", str(out)]) == 0
    plain = masks(out)
    assert len(plain) == len(trained["val"]) and recorded_crf(out) is None
    written = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png")}
    capsys.readouterr()
    assert main([*command, "--out", str(out), "--crf"]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"predict: --out: {out}: its masks come from another run: crf off → on",
        "  fix: give another --out, or --overwrite to delete its masks and start clean"]
    assert masks(out) == plain and recorded_crf(out) is None

    assert main([*command, "--out", str(tmp_path / "fresh"), "--crf"]) == 0
    fresh = masks(tmp_path / "fresh")
    # The tiny model is so sure of the toy images that the CRF may keep their masks: what tells a clean CRF run
    # from a resumed one is that every mask is written again (and none is skipped), with the fresh run's bytes.
    assert main([*command, "--out", str(out), "--crf", "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_done"], summary["predicted"]) == (0, len(plain))
    assert masks(out) == fresh and recorded_crf(out) == CrfConfig().model_dump()
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in written.items())  # every mask written again
    assert main([*command, "--out", str(out), "--crf"]) == 0  # same model and options: resumes
    assert json.loads((out / "summary.json").read_text())["skipped_done"] == len(plain)
