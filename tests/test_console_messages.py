"""What a person reads: the smaller console and report fixes of issue 25 (no Ray needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_ray.cli import main
from wsss_ray.core.items import BadItemError
from wsss_ray.data.image_io import decode_image, decode_photo
from wsss_ray.report.console import format_iou_table
from wsss_ray.report.figures import plot_per_class_iou
from wsss_ray.stages.ingest import skipped_lines

SCORES = {"pseudo-masks image_cam (train)": {"background": 0.8, "cat": 0.5},
          "segmentation (val)": {"background": 0.85, "cat": 0.6},
          "background only (val)": {"background": 0.7, "cat": 0.0}}


def test_iou_table_columns_keep_their_order_when_read_back_sorted() -> None:
    first_run = format_iou_table(SCORES, ["background", "cat"])
    rerun = format_iou_table(dict(sorted(SCORES.items())), ["background", "cat"])  # from JSON, sorted keys
    assert rerun == first_run
    assert first_run.splitlines()[0].split() == ["class", "pseudo-masks", "image_cam", "(train)", "segmentation",
                                                 "(val)", "background", "only", "(val)"]


@pytest.mark.parametrize("decode", [decode_image, decode_photo])
def test_a_non_image_names_the_file_not_a_buffer(decode: object) -> None:
    with pytest.raises(BadItemError) as error:
        decode(b"this is not a picture\n", "photos/notes.jpg")  # type: ignore[operator]
    assert (error.value.file, error.value.reason) == ("photos/notes.jpg",
                                                      "cannot decode image: not an image format Pillow reads")


def test_ingest_says_how_many_more_were_skipped() -> None:
    failures = [{"file": f"JPEGImages/{i}.jpg", "reason": "image file is missing"} for i in range(11)]
    lines = skipped_lines(failures, "out/ingest-x/failures.parquet")
    assert len(lines) == 11 and lines[0] == "skipped JPEGImages/0.jpg: image file is missing"
    assert lines[-1] == "... and 1 more skipped: all 11 in out/ingest-x/failures.parquet"
    assert skipped_lines(failures[:10], "f") == lines[:10]


def test_set_errors_name_the_override_not_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text("output: out\ndataset: {root: data}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain_seg: {epochs: 3}\n")
    assert main(["config", "check", str(tmp_path / "child.yaml"), "--set", "train_seg.epoch=5",
                 "--set", "train_seg.batch_size=sixteen"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error:",
        ('--set train_seg.batch_size=sixteen: train_seg.batch_size: Input should be a valid integer, unable to parse '
        'string as an integer, got "sixteen"'),
        "--set train_seg.epoch=5: train_seg.epoch: unknown field, got 5"]


def test_iou_chart_uses_its_width_and_shows_the_whole_legend() -> None:
    """Long series names in a legend inside the axes squeezed the bars into the right third (issue 25)."""
    scores = {**SCORES, "pseudo-masks image_cam + CRF (train)": {"background": 0.82, "cat": 0.55}}
    image = np.asarray(Image.open(io.BytesIO(plot_per_class_iou(scores))).convert("L"))
    height, width = image.shape
    assert height > width * 0.6  # room below the axes for the legend (two rows)
    drawn = (image[int(0.2 * height): int(0.6 * height)] < 250).any(axis=0)  # the band of the bars
    assert drawn[: width // 3].mean() > 0.5, "the left third of the plot is empty"


def test_results_read_back_sorted_print_as_the_first_run(capsys: pytest.CaptureFixture[str]) -> None:
    from wsss_ray.report.console import print_results

    metrics = {"per_class_iou": SCORES, "val_miou": 0.7, "background_only_miou": 0.35,
               "pseudo_mask_miou": {"pseudo": 0.2, "cam": 0.17},
               "failed_images": {"ingest": 1, "pseudo_labels": 0, "evaluate": 2}, "failures_uri": "f.parquet"}
    outputs = []
    for run in (metrics, {**metrics, "pseudo_mask_miou": {"cam": 0.17, "pseudo": 0.2},
                          "failed_images": dict(sorted(metrics["failed_images"].items()))}):
        print_results({"evaluate": {"metrics": run, "report_uri": "report.html"}}, ["background", "cat"], "out", 3.0)
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "failed images: ingest 1, pseudo_labels 0, evaluate 2 (list: f.parquet)" in outputs[0]
