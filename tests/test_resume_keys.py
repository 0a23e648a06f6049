"""Every per-item stage resumes only what the same model and options produced: its folder is keyed by them.

``predict`` keys its ``--out`` by the model's SHA-256 and the options (tests/test_predict.py); the pipeline's
per-item stages (ingest, pseudo_labels, evaluate) resume inside ``<stage>-<key>`` folders whose key covers their
config and, once the training before them is complete, the trained weights' SHA-256. No Ray needed.
"""

from __future__ import annotations

from pathlib import Path

from wsss_ray.core import storage
from wsss_ray.core.stage_dir import SUCCESS
from wsss_ray.pipeline import stage_dirs
from wsss_ray.pipeline_config import parse_config


def _config(tmp_path: Path, **sections: object) -> object:
    return parse_config({"output": str(tmp_path / "out"), "dataset": {"root": str(tmp_path / "voc")}, **sections})


def _finish(uri: str, sha: str) -> None:
    storage.write_json(storage.join(uri, SUCCESS), {"model_sha256": sha})


def test_per_item_stages_are_keyed_by_the_weights_and_options(tmp_path: Path) -> None:
    config = _config(tmp_path)
    before = stage_dirs(config)
    _finish(before["train_cls"].uri, "a" * 64)
    trained_a = stage_dirs(config)
    # pseudo_labels (and so everything after it) moves to another folder once the classifier exists ...
    assert trained_a["pseudo_labels"].uri != before["pseudo_labels"].uri
    _finish(trained_a["train_cls"].uri, "b" * 64)  # ... and to another one for other weights
    trained_b = stage_dirs(config)
    assert trained_b["pseudo_labels"].uri != trained_a["pseudo_labels"].uri
    assert trained_b["train_cls"].uri == trained_a["train_cls"].uri and trained_b["ingest"].uri == trained_a["ingest"].uri

    _finish(trained_b["train_seg"].uri, "c" * 64)
    evaluate_c = stage_dirs(config)["evaluate"].uri
    _finish(trained_b["train_seg"].uri, "d" * 64)
    assert stage_dirs(config)["evaluate"].uri != evaluate_c  # evaluate: keyed by the segmentation weights too
    with_crf = stage_dirs(_config(tmp_path, evaluate={"crf": {}}))
    assert with_crf["evaluate"].uri != stage_dirs(config)["evaluate"].uri  # and by its options
    other_generator = stage_dirs(_config(tmp_path, pseudo_labels={"generator": {"bg_score": 0.3}}))
    assert other_generator["pseudo_labels"].uri != trained_b["pseudo_labels"].uri
    assert stage_dirs(_config(tmp_path, dataset={"root": str(tmp_path / "voc"), "max_images": 3}))["ingest"].uri != \
        before["ingest"].uri
