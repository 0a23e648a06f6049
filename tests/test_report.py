"""HTML report and visualisation helpers: colours, overlays, panels, charts and the written report folder."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_ray.report.figures import (
    colorize,
    encode_png,
    label_colormap,
    make_panel,
    overlay,
    plot_curves,
    plot_per_class_iou,
)
from wsss_ray.report.html import format_value, mean_iou, sample_panel, write_report

CLASSES = ["background", "aeroplane", "bicycle"]


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _synthetic_sample(h: int = 24, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), dtype=np.uint8)
    label[4:12, 4:12] = 1
    label[14:20, 16:28] = 2
    label[0, :] = 255
    return image, label


def test_colorize_uses_voc_colours() -> None:
    label = np.array([[0, 1], [15, 255]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[0, 1]) == (128, 0, 0)
    assert tuple(rgb[1, 0]) == (192, 128, 128)
    assert tuple(rgb[1, 1]) == (224, 224, 192)
    assert label_colormap().shape == (256, 3)


def test_overlay_blends_classes_and_keeps_background() -> None:
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    label = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    out = overlay(image, label, alpha=0.5)
    assert tuple(out[0, 0]) == (100, 100, 100)  # background untinted
    assert tuple(out[0, 1]) == (114, 50, 50)  # 0.5 * 100 + 0.5 * (128, 0, 0)
    assert tuple(out[1, 0]) == (131, 131, 123)  # ignore at half alpha: 0.75 * 100 + 0.25 * (224, 224, 192)
    # A label at another resolution is resized to the image with nearest neighbour.
    assert overlay(np.zeros((8, 8, 3), np.uint8), np.ones((4, 4), np.uint8)).shape == (8, 8, 3)


def test_make_panel_aligns_heights_and_encodes() -> None:
    image, label = _synthetic_sample()
    panel = make_panel({"image": image, "ground truth": overlay(image, label), "small": image[::2, ::2]},
                       title="an <id>")
    assert panel.dtype == np.uint8 and panel.ndim == 3
    assert panel.shape[0] > image.shape[0] and panel.shape[1] >= 3 * image.shape[1]
    assert _png(encode_png(panel)).size == (panel.shape[1], panel.shape[0])


def test_charts_are_pngs() -> None:
    curves = _png(plot_curves({"classifier": {"loss": [1.0, 0.5, 0.25]}, "empty": {}}, "curves"))
    assert curves.size[0] > 100 and curves.size[1] > 100
    assert _png(plot_curves({}, "nothing")).size[0] > 0
    bars = _png(plot_per_class_iou({"a": {"x": 0.5, "y": None}, "b": {"x": float("nan"), "y": 0.2}}))
    assert bars.size[0] > 100


def test_format_value_and_mean_iou() -> None:
    assert format_value(0.612345) == "0.6123"
    assert format_value(12.3456) == "12.35"
    assert format_value(123456.7) == "123,457"
    assert format_value(0) == "0"
    assert format_value("abc") == "abc"
    assert format_value({"cam": 1.5, "crf": 2}) == "cam: 1.5, crf: 2"
    assert mean_iou({"a": 0.5, "b": None, "c": float("nan"), "d": 0.25}) == pytest.approx(0.375)
    assert mean_iou({"a": None}) is None


def test_write_report(tmp_path: Path) -> None:
    image, label = _synthetic_sample()
    pred = label.copy()
    pred[4:12, 4:8] = 0
    tables = {
        "pseudo-mask quality (train)": {
            "thresholded CAM": {"background": 0.7, "aeroplane": 0.4, "bicycle": None},
            "CRF pseudo-mask": {"background": 0.8, "aeroplane": 0.35, "bicycle": 0.2},
        },
        "segmentation (val)": {"DeepLab": {"background": 0.9, "aeroplane": 0.55, "bicycle": 0.3}},
    }
    failures = [{"image_id": f"img{i}", "file": f"img{i}.jpg", "reason": "bad <script>alert(1)</script>"}
                for i in range(60)]
    samples = [
        {"image_id": "2007_000032", "image": image, "columns": {"ground truth": label, "prediction": pred}},
        {"image_id": "a&b", "image": image, "columns": {"pseudo-mask": label}},
    ]
    uri = write_report(
        str(tmp_path / "report"),
        title="Run <1>",
        summary={"pseudo-mask mIoU (CRF)": 0.612345, "images/s": 12.3, "failed items": 60},
        tables=tables,
        samples=samples,
        curves={"classifier": {"loss": [1.0, 0.7, 0.5]}, "segmentation": {"loss": [2.0, 1.0], "val_miou": [0.3, 0.5]}},
        failures=failures,
        notes=["uses <b>fake</b> data"],
        class_names=CLASSES,
    )
    report = Path(uri)
    assert report == tmp_path / "report" / "report.html" and report.is_file()
    text = report.read_text(encoding="utf-8")

    for name in CLASSES:
        assert f">{name}<" in text
    # mIoU over non-None classes, as a percentage with one decimal; best per column in bold.
    assert "<b>55.0</b>" in text  # thresholded CAM mIoU: (0.7 + 0.4) / 2, beats CRF's (0.8 + 0.35 + 0.2) / 3
    assert f">{(0.8 + 0.35 + 0.2) / 3 * 100:.1f}<" in text
    assert "<b>80.0</b>" in text and ">70.0<" in text and "<b>40.0</b>" in text
    assert f">{(0.9 + 0.55 + 0.3) / 3 * 100:.1f}<" in text  # single-row table: nothing to beat, not bold
    assert "\u2013" in text  # None cell
    assert "0.6123" in text and "12.3" in text

    # All user text is escaped.
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Run &lt;1&gt;" in text and "&lt;b&gt;fake&lt;/b&gt;" in text and "a&amp;b" in text
    assert "60 failed item(s), first 50 shown" in text
    assert text.count("img5.jpg") == 1 and "img49.jpg" in text and "img50.jpg" not in text

    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert {"curves.png", "per_class_iou.png", "per_class_iou_1.png",
            "overlays/sample_00.png", "overlays/sample_01.png"} == set(srcs)
    for src in srcs:
        path = report.parent / src
        assert path.is_file(), src
        img = _png(path.read_bytes())
        assert img.size[0] > 0 and img.size[1] > 0
    expected = sample_panel(image, samples[0]["columns"])
    assert expected.shape[0] > image.shape[0] and expected.shape[1] > 3 * image.shape[1]
    assert Image.open(report.parent / "overlays/sample_00.png").size == (expected.shape[1], expected.shape[0])
    # A panel pixel in the prediction column keeps the overlay colour of class 1 (not resampled away).
    pixels = np.asarray(Image.open(report.parent / "overlays/sample_00.png").convert("RGB"))
    assert (pixels == overlay(image, pred)[8, 10]).all(axis=2).any()


def test_write_report_minimal(tmp_path: Path) -> None:
    uri = write_report(str(tmp_path), title="empty", summary={}, tables={}, samples=[])
    text = Path(uri).read_text(encoding="utf-8")
    assert "<h2>Failures</h2>" in text and '<p class="none">none</p>' in text
    assert not re.findall(r"<img ", text)


def test_sample_legends_name_the_classes_present(tmp_path: Path) -> None:
    image, label = _synthetic_sample()  # classes 0, 1, 2 and the ignore value 255
    names = ["background", "aeroplane", "bicycle", "bird"]
    text = Path(write_report(str(tmp_path), title="t", summary={}, tables={}, class_names=names,
                             samples=[{"image_id": "x", "image": image, "columns": {"gt": label}}])).read_text()
    caption = re.search(r"<figcaption>(.*?)</figcaption>", text).group(1)
    # one swatch per value in the label: the three class names and "ignore"; "bird" does not occur
    assert re.findall(r"</span>([^<]+)", caption) == ["background", "aeroplane", "bicycle", "ignore"]
    assert "class 1" not in caption


def test_classes_absent_from_every_row_are_left_out(tmp_path: Path) -> None:
    nan = float("nan")
    tables = {"IoU per class": {
        "pseudo-mask (train)": {"background": 0.8, "aeroplane": 0.4, "bicycle": None, "bird": None},
        "segmentation (val)": {"background": 0.9, "aeroplane": None, "bicycle": 0.2, "bird": nan},
    }}
    text = Path(write_report(str(tmp_path), title="t", summary={}, tables=tables, samples=[])).read_text()
    header = re.search(r"<thead>(.*?)</thead>", text).group(1)
    # bird has no IoU anywhere (no ground-truth or predicted pixel): no column; the others stay, mIoU last
    assert re.findall(r'<th class="[a-z]+">([^<]+)</th>', header) == ["background", "aeroplane", "bicycle", "mIoU"]
    assert ">bird<" not in text
    # a class scored in one row only keeps its column, with a dash where the other row has no IoU
    assert text.count("\u2013") == 2
    assert f">{(0.9 + 0.2) / 2 * 100:.1f}<" in text and f">{(0.8 + 0.4) / 2 * 100:.1f}<" in text
