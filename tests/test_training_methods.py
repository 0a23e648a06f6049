"""Every training method from config on the local Ray cluster: the segmentation losses, OuT, robust
early-learning, the three DeepLabs, and the KTSE and BAP classifiers, on local storage and on the S3 server.

The segmentation runs train on maps made here from the generated ground truth (what the pseudo-label stage
would write), so each run is one short Ray Train fit; ``test_pipeline`` covers the stages feeding each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import kill_worker_when

from wsss_ray.core import storage
from wsss_ray.core.config_base import DatasetConfig, SegModelConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.maths.inference import multiscale_cams
from wsss_ray.methods.cdsp.distance import boundary_distance, scribble_distance, to_uint8
from wsss_ray.methods.mspn.seeds import proposals, vote
from wsss_ray.methods.registry import build_classifier
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.weights import load_weights
from wsss_ray.pipeline_config import ClassifierTrainConfig, SegTrainConfig
from wsss_ray.stages.ingest import build_manifest, load_manifest
from wsss_ray.stages.train_cls import train_classifier
from wsss_ray.stages.train_seg import train_segmentation
from wsss_ray.training.ingest import RowSource, augment_rng, shard_stream

pytestmark = pytest.mark.integration

NUM_CLASSES = 21  # VOC label space; the toy data uses the first few classes
WORKERS = {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0}
# One worker where the method, not DDP, is under test: batch_size is the global batch and the data order does not
# depend on the worker count, so one worker trains on the same batches; the loop's cross-worker parts (metric and
# confusion all-reduce, val sharding, OuT's per-worker corrected masks, resume) run in the two-worker tests.
ONE_WORKER = {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0}
AUGMENT = {"crop_size": 48, "scale_min": 0.75, "scale_max": 1.25}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """8 train / 2 val toy VOC images at 48² with boxes and scribbles, and per-image method maps."""
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(str(root / "voc"), num_train=8, num_val=2, image_size=48, num_classes=3, seed=5)
    stage = StageDir.create(str(root / "out"), "ingest", "toy")
    build_manifest(DatasetConfig(root=str(root / "voc"), train_split="train", val_split="val",
                                 supervision="boxes"), stage)
    train, val = load_manifest(stage, "train"), load_manifest(stage, "val")
    rng = np.random.default_rng(0)
    maps = root / "maps"
    records = []
    for r in train:
        truth = read_label(r["mask_uri"])
        truth = np.where(truth == 255, 0, truth).astype(np.uint8)
        image_id = r["image_id"]
        # Six "seeds": the truth with independent random flips to background, so votes disagree somewhere.
        seeds = np.stack([np.where(rng.random(truth.shape) < 0.2, 0, truth) for _ in range(6)]).astype(np.uint8)
        majority, agreement = vote(seeds)
        tags = weak_tags(r, "boxes")
        scribble = read_label(r["scribble_uri"])
        arrays = {"label": truth, "retrieved": np.where(rng.random(truth.shape) < 0.3, 0, truth).astype(np.uint8),
                  "majority": majority, "agreement": agreement, "proposed": proposals(seeds, [0, *tags]),
                  "dist_scribble": to_uint8(scribble_distance(scribble, 2.0)),
                  "dist_boundary": to_uint8(boundary_distance(truth, 7.0))}
        row = {"image_id": image_id, "image_uri": r["image_uri"], "scribble_uri": r["scribble_uri"],
               "label_list": [0, *tags]}
        for name, array in arrays.items():
            path = maps / name / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_label_png(array))
            row[f"{name}_uri"] = str(path)
        records.append(row)
    return {"records": records, "val": val, "train": train, "root": root}


def seg_config(model: str, loss: dict[str, Any], **extra: Any) -> SegTrainConfig:
    return SegTrainConfig.model_validate({
        "model": {"name": model, "backbone": {"name": "resnet_tiny", "output_stride": 16}, "aspp_channels": 16},
        "loss": loss, "epochs": 2, "batch_size": 4, "optimizer": {"lr": 0.01}, "augment": AUGMENT,
        "workers": WORKERS, **extra})


def test_shard_stream_reshuffles_every_epoch_and_repeats_across_runs(ray_cluster: None) -> None:
    """Each epoch a new order and new crops from (seed, epoch); two runs alike; and the data order does not
    depend on the worker count: global batch k holds the same rows (with the same draws) for W = 1 and W = 2."""
    records = [{"image_id": f"{i:03d}"} for i in range(40)]

    def draw(row: dict[str, Any]) -> dict[str, Any]:  # a closure: Ray workers cannot import this test module
        return {"image_id": row["image_id"], "draw": np.float64(augment_rng(row).random())}

    source = RowSource(records, draw)

    def epochs(seed: int, world: int, first: int = 0) -> list[list[list[tuple[str, float]]]]:
        """[epoch][global batch] -> the batch's rows (image id, draw), the workers' slices concatenated."""
        streams = [shard_stream(source, seed, range(first, 3), 5, 8, rank, world, local_rows=0)  # the Ray stream
                   for rank in range(world)]
        out = []
        for _ in range(first, 3):
            batches = [[[tuple(pair) for pair in zip(b["image_id"], b["draw"], strict=True)]
                        for b in (next(stream) for _ in range(5))] for stream in streams]
            out.append([[row for r in range(world) for row in batches[r][k]] for k in range(5)])
        return out

    first, again, other, two = epochs(0, 1), epochs(0, 1), epochs(1, 1), epochs(0, 2)
    ids = [[image_id for batch in epoch for image_id, _ in batch] for epoch in first]
    assert all(sorted(order) == [r["image_id"] for r in records] for order in ids)  # each epoch sees every row once
    assert len({tuple(order) for order in ids}) == 3 and ids[0] != sorted(ids[0])  # a new order every epoch
    draws = [dict(row for batch in epoch for row in batch) for epoch in first]
    assert all(draws[0][i] != draws[1][i] for i in draws[0])  # new crops every epoch
    assert first == again  # the same seed: the same orders and crops
    assert other[0] != first[0]
    assert two == first  # two workers: the same global batches as one
    assert epochs(0, 2, first=2) == first[2:]  # a run resumed at epoch 2 sees epoch 2's draws


METHODS = {
    "v3plus+sce+out_cumulative+early_learning": (
        "deeplab_v3plus", {"name": "sce"},
        {"corrector": {"inflection_epoch": 1, "strategy": "replace", "mode": "cumulative", "confidence": 0.0},
         "early_learning": {"key_fraction": 0.4}},
        ["changed", "labelled_after", "key_fraction"]),
    "v2+nal": ("deeplab_v2", {"name": "nal"}, {}, ["loss_ce", "loss_wce", "loss_agree_fraction"]),
    "v3+cdsp": ("deeplab_v3", {"name": "cdsp", "lorm_channels": 8}, {}, ["loss_partial_ce", "loss_lorm", "loss_de_ds"]),
    "v3+mspn": ("deeplab_v3", {"name": "mspn", "agreement": 5}, {}, ["loss_pos", "loss_neg", "loss_indirect"]),
    "v3+curriculum+out_nnss+cosine": (
        "deeplab_v3", {"name": "curriculum", "epsilon": 0.25},
        {"corrector": {"inflection_epoch": 1, "strategy": "nnss", "confidence": 0.0},
         "optimizer": {"lr": 0.01, "schedule": "warmup_cosine", "warmup_epochs": 1}},
        ["newly_ignored"]),
}
# Trained by two DDP workers (the rest by one): OuT's cumulative masks are written by the worker that visits
# each image, early learning's key fraction is all-reduced. test_same_seed_trains_the_same_way runs it again.
DDP_METHOD = "v3plus+sce+out_cumulative+early_learning"
FINISHED: dict[str, dict[str, Any]] = {}  # method -> the summary of its run in this module, for the same-seed test


def method_config(method: str) -> SegTrainConfig:
    model, loss, extra, _ = METHODS[method]
    return seg_config(model, loss, workers=WORKERS if method == DDP_METHOD else ONE_WORKER, **extra)


@pytest.mark.parametrize("method", list(METHODS))
def test_segmentation_method_trains_from_config(ray_cluster: None, toy: dict[str, Any], s3_prefix: str,
                                                tmp_path: Path, method: str) -> None:
    logged = METHODS[method][3]
    config = method_config(method)
    # NAL and MSPN write to the S3 server, the others to a local folder: both storages train every part.
    out = s3_prefix if method in ("v2+nal", "v3+mspn") else str(tmp_path / "out")
    stage = StageDir.create(out, "train_seg", method.replace("+", "-"))
    summary = train_segmentation(toy["records"], stage, config, NUM_CLASSES, toy["val"])
    FINISHED[method] = summary
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in history)
    for key in logged:  # the method's own terms reach the epoch metrics (second epoch: OuT is active)
        assert key in history[-1], (key, sorted(history[-1]))
    assert 0.0 <= history[-1]["val_miou"] <= 1.0
    assert storage.list_files(stage.path("tensorboard"))  # event files, also on S3
    net = load_weights(build_segmentation_model(SegModelConfig.model_validate(config.model.model_dump()),
                                                NUM_CLASSES), summary["model_uri"]).eval()
    assert net(torch.zeros(1, 3, 48, 48)).shape == (1, NUM_CLASSES, 48, 48)
    if config.corrector is not None and config.corrector.mode == "cumulative":
        # Every image visited after the inflection epoch carries its corrected mask at full resolution.
        carried = storage.list_files(stage.path("corrected"))
        assert len(carried) == len(toy["records"])
        first = read_label(carried[0])
        assert first.shape == read_image(toy["records"][0]["image_uri"]).shape[:2]
    if config.early_learning is not None:
        assert 0.3 < history[-1]["key_fraction"] <= 0.5


@pytest.mark.parametrize("head", ["ktse", "bap"])
def test_classifier_heads_train_and_give_cams(ray_cluster: None, toy: dict[str, Any], tmp_path: Path,
                                              head: str) -> None:
    # KTSE: one warm-up epoch (L_cls alone; the trainer's set_epoch reaches the objective), then the full loss.
    loss = {"name": head, "warmup_epochs": 1} if head == "ktse" else {"name": head}
    config = ClassifierTrainConfig.model_validate({
        "backbone": {"name": "resnet_tiny"}, "head": {"name": head}, "loss": loss, "epochs": 2 if head == "ktse" else 1,
        "batch_size": 4, "augment": AUGMENT, "workers": ONE_WORKER})
    stage = StageDir.create(str(tmp_path / "out"), "train_cls", head)
    summary = train_classifier(toy["train"], stage, config, NUM_CLASSES, "boxes")
    epoch = summary["history"][-1]
    assert np.isfinite(epoch["loss"])
    expected = {"ktse": ["loss_cls", "loss_kt", "loss_ce", "loss_global"], "bap": ["loss_box_ce", "loss_bg_ce"]}
    assert set(expected[head]) <= set(epoch)
    if head == "ktse":
        assert "loss_cls" in summary["history"][0] and "loss_kt" not in summary["history"][0]
    model = load_weights(build_classifier(config, NUM_CLASSES - 1), summary["model_uri"]).eval()
    record = toy["train"][0]
    image = read_image(record["image_uri"])
    cams = multiscale_cams(model, image, weak_tags(record, "boxes"), [1.0], True)
    assert cams.shape == (len(weak_tags(record, "boxes")), *image.shape[:2])
    assert np.isfinite(cams).all() and cams.max() <= 1.0 + 1e-6


def test_killed_training_worker_resumes_with_its_teacher(ray_cluster: None, toy: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """SIGKILL a Ray Train worker once the first epoch's checkpoint exists: the group restarts from it (model,
    optimizer, OuT's EMA teacher) and the run finishes every epoch exactly once."""
    import threading

    config = seg_config("deeplab_v3", {"name": "cross_entropy"},
                        corrector={"inflection_epoch": 1, "strategy": "nnss", "confidence": 0.0},
                        epochs=4, workers={**WORKERS, "max_failures": 2})
    stage = StageDir.create(str(tmp_path / "out"), "train_seg", "killed")
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(train_segmentation(
        toy["records"], stage, config, NUM_CLASSES)))
    runner.start()
    checkpoints = Path(stage.path("ray_train"))
    victims = kill_worker_when("RayTrainWorker", lambda: any(checkpoints.rglob("teacher.pt")), runner.is_alive,
                               timeout_s=240)
    runner.join(timeout=600)
    assert victims, "training finished before a worker could be killed"
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # resumed, not restarted: each epoch once
    assert all(np.isfinite(h["loss"]) for h in history)


def test_same_seed_trains_the_same_way(ray_cluster: None, toy: dict[str, Any], tmp_path: Path) -> None:
    """Two runs of one config give the same losses and the same weights, with two DDP workers: initial weights,
    shuffle and crops are seeded, and the rows reach the workers in order (a sweep compares configs, not luck).
    The config is DDP_METHOD's (OuT's corrections and early learning's key pixels must repeat too); its run in
    test_segmentation_method_trains_from_config is the first of the two where it ran in this session."""
    config = method_config(DDP_METHOD)

    def train(name: str) -> dict[str, Any]:
        return train_segmentation(toy["records"], StageDir.create(str(tmp_path), "train_seg", name), config,
                                  NUM_CLASSES, toy["val"])

    runs = [FINISHED.get(DDP_METHOD) or train("first"), train("again")]
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]
    assert runs[0]["model_sha256"] == runs[1]["model_sha256"]


# One worker: the chains check that each paper's components feed each other through the real stages; two-worker
# DDP is covered by the runs above, and a second worker process per fit doubles the chains' start-up.
CHAIN_WORKERS = {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0}

# Each paper's chain through the real stages: the classifier it needs, its generator, the loss reading that
# generator's outputs (what the demo_*.yaml configs run, at test size).
CHAINS = {
    "bana": {"dataset": {"supervision": "boxes"}, "train_cls": {"head": {"name": "bap"}, "loss": {"name": "bap"}},
             "pseudo_labels": {"generator": {"name": "box", "scales": [1.0]}},
             "train_seg": {"loss": {"name": "nal"}}},
    "cdsp": {"dataset": {"supervision": "scribbles"},
             "pseudo_labels": {"generator": {"name": "scribble", "scales": [1.0], "bg_score": 0.2}},
             "train_seg": {"model": {"name": "deeplab_v3plus"}, "loss": {"name": "cdsp", "lorm_channels": 8}}},
    "mspn": {"pseudo_labels": {"generator": {"name": "multi_seed", "seeds": [[0.05, 1.0], [0.1, 1.0], [0.2, 1.0]],
                                             "agreement": 2, "bg_score": 0.2}},
             "train_seg": {"loss": {"name": "mspn", "agreement": 2}, "corrector": None}},
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_paper_chain_runs_through_the_pipeline(ray_cluster: None, toy: dict[str, Any], tmp_path: Path,
                                               chain: str) -> None:
    from wsss_ray.pipeline import run_pipeline
    from wsss_ray.pipeline_config import parse_config

    small = {"name": "resnet_tiny", "output_stride": 16}
    sections = CHAINS[chain]
    base: dict[str, Any] = {
        "output": str(tmp_path / "out"),
        "dataset": {"root": str(toy["root"] / "voc"), "train_split": "train", "val_split": "val",
                    **sections.get("dataset", {})},
        "train_cls": {"backbone": small, "epochs": 1, "batch_size": 4, "augment": AUGMENT, "workers": CHAIN_WORKERS,
                      **sections.get("train_cls", {})},
        "pseudo_labels": sections["pseudo_labels"],
        "train_seg": {"model": {"backbone": small, "aspp_channels": 8, **sections["train_seg"].get("model", {})},
                      "epochs": 1, "batch_size": 4, "augment": AUGMENT, "workers": CHAIN_WORKERS,
                      "loss": sections["train_seg"]["loss"]},
    }
    summaries = run_pipeline(parse_config(base, source=chain), until="train_seg")
    assert summaries["pseudo_labels"]["failed"] == 0
    loss_terms = {k for k in summaries["train_seg"]["history"][0] if k.startswith("loss_")}
    assert loss_terms, summaries["train_seg"]["history"]
    assert np.isfinite(summaries["train_seg"]["history"][0]["loss"])
