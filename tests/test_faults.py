"""What real clusters do to a run, on a simulated multi-node Ray cluster: nodes lost and added mid-stage, an
elastic training group, the S3 endpoint going away, the driver killed.

``ray.cluster_utils.Cluster`` (as in Ray's own tests) runs a 0-CPU head and worker nodes, each its own raylet with
its own resources, all on loopback. Every output goes to moto's S3 server through a TCP proxy that the outage
tests switch off. One tiny pipeline run (the module fixture) gives the classifier, the reference pseudo-masks
and the reference model the faulted runs are compared with.

This module's cluster is the process's Ray driver connection, so it must not overlap the session ``ray_cluster``
fixture's local cluster: conftest runs ``faults`` tests first, and the fixture refuses to start if Ray is up.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from conftest import ray_temp_dir
from faults_proxy import TcpProxy
from ray.cluster_utils import Cluster

from wsss_ray.core import storage
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.pipeline import run_pipeline, stage_dirs
from wsss_ray.pipeline_config import PipelineConfig, PseudoLabelConfig, parse_config
from wsss_ray.stages.ingest import load_manifest
from wsss_ray.stages.pseudo_labels import generate_pseudo_labels, segmentation_records

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
NODE_CPUS = 3  # logical: a 2-CPU training worker per node plus one CPU for Ray Data's tasks beside it
S3_RETRIES = 8  # ~6.4 s of backoff per request (50 ms doubling): above the short outages, below the long one
# Node death is noticed by the GCS's health checks: 1 s apart, 3 misses (Ray's defaults take ~15 s).
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                      "health_check_timeout_ms": 1000, "health_check_initial_delay_ms": 1000}
# A worker group that cannot be placed (sized on a view of the cluster that still has the lost node) retries
# after this, not 60 s. Placing a group on free resources takes well under a second.
START_TIMEOUT_S = "5"
# Ray Train's controller polls its workers (reports, health, finished) this often; 2 s by default. Polling
# faster ends each of the module's ~12 training runs sooner and notices a lost worker sooner.
TRAIN_POLL_S = "0.5"
RESULTS: list[tuple[str, str, str, int, int]] = []  # the table the module prints at the end


def record(fault: str, stage: str, outcome: str, lost: int, duplicated: int) -> None:
    RESULTS.append((fault, stage, outcome, lost, duplicated))
    print(f"FAULT | {fault} | {stage} | {outcome} | lost {lost} | duplicated {duplicated}", flush=True)


# ------------------------------------------------------------------------------------------------ the cluster


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (the process tree of the whole machine, as of now)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def node_titles(node: Any) -> list[str]:
    """The command lines (Ray sets them to the task or actor running) of every process under a node's raylet."""
    tree, titles = _children(), []
    todo = list(tree.get(node.all_processes["raylet"][0].process.pid, []))
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return titles


class Sim:
    """The simulated cluster and the proxy in front of S3."""

    def __init__(self, cluster: Cluster, proxy: TcpProxy) -> None:
        self.cluster, self.proxy = cluster, proxy

    def add_node(self) -> Any:
        node = self.cluster.add_node(num_cpus=NODE_CPUS)
        self.cluster.wait_for_nodes()
        return node

    def node_running(self, marker: str, started: bool = False) -> Any | None:
        """The worker node one of whose Ray worker processes has ``marker`` in its command line (process title);
        ``started``: an actor past its constructor (Ray titles it ``ray::Class.__init__`` while that runs)."""
        for node in self.cluster.worker_nodes:
            if any(marker in title and not (started and ".__init__" in title) for title in node_titles(node)):
                return node
        return None

    def wait_for_node_running(self, marker: str, alive: Callable[[], bool], timeout_s: float,
                              started: bool = False) -> Any:
        """The first worker node seen running a process with ``marker`` in its title, polled while ``alive()``."""
        found: list[Any] = []

        def seen() -> bool:
            found[:] = [node] if (node := self.node_running(marker, started)) is not None else []
            return bool(found)

        wait_for(seen, alive, timeout_s, f"a node running {marker}")
        return found[0]

    @staticmethod
    def refresh_reservations() -> None:
        """Have Ray's AutoscalingCoordinator (the actor that hands Ray Train and Ray Data their share of the
        nodes) re-read the cluster now. It does so every 20 s on its own (``TICK_INTERVAL_S``), so an elastic
        group sees an added node up to 20 s late, and the short test run could end before that."""
        try:
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:  # not started yet (no Ray Data or elastic Train run so far): nothing to refresh
            return
        ray.get(coordinator.get_reserved_resources.remote("wsss-ray-faults-test", recompute=True))

    def lose_node(self, node: Any) -> None:
        """A node lost without warning (hardware failure, spot reclaim past its notice): SIGKILL, no draining.
        Returns once the GCS has marked it dead and the autoscaling coordinator has seen that: an elastic group
        restarting on the coordinator's stale view asks for the lost node's workers too, and waits
        ``START_TIMEOUT_S`` before it tries again with what is left."""
        node_id = node.node_id
        self.cluster.remove_node(node, allow_graceful=False)
        wait_for(lambda: not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()), lambda: True, 60,
                 "the GCS to mark the lost node dead")
        self.refresh_reservations()


@pytest.fixture(scope="module")
def sim(s3_server: Any) -> Iterator[Sim]:
    if ray.is_initialized():
        pytest.fail("a Ray driver is already connected in this process (the ray_cluster fixture?): the faults "
                    "tests need their own multi-node cluster; conftest orders them first")
    proxy = TcpProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    proxy.up()
    # Raylets (and so every Ray worker) inherit this environment when their node starts: S3 through the proxy.
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", storage.RETRIES_VAR, "RAY_AUTH_MODE",
                                            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    os.environ.update({"AWS_ENDPOINT_URL": proxy.endpoint, storage.RETRIES_VAR: str(S3_RETRIES),
                       "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": START_TIMEOUT_S,
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_S})
    # A short fresh temp dir of its own in the session's Ray root (conftest): socket paths have a length limit.
    temp_dir = ray_temp_dir()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": HEAD_SYSTEM_CONFIG, "temp_dir": temp_dir})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield Sim(cluster, proxy)
    finally:
        ray.shutdown()
        cluster.shutdown()
        proxy.down()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        print("\n| fault | stage | outcome | outputs lost | outputs duplicated |\n|---|---|---|---|---|")
        for row in RESULTS:
            print("| " + " | ".join(str(v) for v in row) + " |")


def pipeline_dict(root: str, output: str) -> dict[str, Any]:
    small = {"name": "resnet_tiny", "output_stride": 16}
    augment = {"crop_size": 64, "scale_min": 0.9, "scale_max": 1.1}
    workers = {"num_workers": 1, "cpus_per_worker": 2.0, "max_failures": 2}
    return {
        "name": "faults", "output": output,
        "dataset": {"format": "voc", "root": root, "train_split": "train", "val_split": "val"},
        "train_cls": {"backbone": small, "epochs": 1, "batch_size": 4, "augment": augment, "workers": workers},
        # Four scales make the stage long enough to be hit mid-way; two CAM actors, one per node.
        "pseudo_labels": {"generator": {"scales": [1.0, 0.75, 1.25, 1.5], "bg_score": 0.2}, "max_actors": 2,
                          "batch_size": 2},
        "train_seg": {"model": {"backbone": small, "aspp_channels": 16}, "epochs": 1, "batch_size": 4,
                      "val_every": 0, "augment": augment, "workers": workers},
        "evaluate": {"num_samples": 1},
    }


@pytest.fixture(scope="module")
def base(sim: Sim, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted reference run of the whole pipeline on the cluster (dataset and outputs on S3)."""
    data = tmp_path_factory.mktemp("toy")
    make_toy_dataset(str(data), fmt="voc", num_train=16, num_val=4, image_size=64, num_classes=3, seed=3)
    root = f"s3://{s3_server.bucket}/faults/data"
    storage.upload_dir(str(data), root)
    raw = pipeline_dict(root, f"s3://{s3_server.bucket}/faults/reference")
    config = parse_config(raw, source="faults")
    start = time.monotonic()
    summaries = run_pipeline(config)
    print(f"reference pipeline: {time.monotonic() - start:.1f} s", flush=True)
    dirs = stage_dirs(config)
    records = load_manifest(dirs["ingest"], "train")
    return {"raw": raw, "config": config, "summaries": summaries, "dirs": dirs, "records": records,
            "root": root, "tmp": tmp_path_factory.mktemp("faults")}


def pseudo_kwargs(base: dict[str, Any], **generator: Any) -> dict[str, Any]:
    config: PipelineConfig = base["config"]
    pseudo = config.pseudo_labels
    if generator:
        pseudo = PseudoLabelConfig.model_validate({**pseudo.model_dump(mode="json"), "generator": {
            **pseudo.generator.model_dump(mode="json"), **generator}})
    return {"model_uri": base["summaries"]["train_cls"]["model_uri"], "cls_config": config.train_cls,
            "config": pseudo, "num_classes": 21, "supervision": "tags", "class_names": VOC_CLASSES}


def in_thread(fn: Callable[[], dict[str, Any]]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; its result (or the exception it raised, under "error") lands in the dict."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            out["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_for(condition: Callable[[], bool], alive: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert alive(), f"finished before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def pngs(stage: StageDir) -> list[str]:
    return storage.list_files(stage.path("pseudo"), suffix=".png")


def raw_stats_ids(stage: StageDir) -> list[str]:
    """Every stats row's image id as stored, before ``read_stats`` keeps one row per image."""
    ids: list[str] = []
    for uri in storage.list_files(stage.path("stats"), suffix=".parquet"):
        ids.extend(storage.read_parquet(uri).column("image_id").to_pylist())
    return ids


def check_pseudo(stage: StageDir, summary: dict[str, Any], records: list[dict[str, Any]],
                 reference: StageDir | None) -> tuple[int, int]:
    """One PNG per input (byte-identical to ``reference``), one stats row per input; returns (lost, duplicated)."""
    expected = {f"{r['image_id']}.png" for r in records}
    names = [uri.rsplit("/", 1)[-1] for uri in pngs(stage)]
    ids = raw_stats_ids(stage)
    lost = len(expected - set(names)) + len({r["image_id"] for r in records} - set(ids))
    duplicated = (len(ids) - len(set(ids))) + (len(names) - len(set(names)))
    assert summary["written"] == len(records) and summary["failed"] == 0, summary
    assert sorted(names) == sorted(expected)
    assert sorted(ids) == sorted(r["image_id"] for r in records), "stats rows lost or duplicated"
    if reference is not None:
        for name in names:
            assert storage.read_bytes(stage.path("pseudo", name)) == \
                storage.read_bytes(reference.path("pseudo", name)), name
    return lost, duplicated


# ------------------------------------------------------------------------------------------------ 1. pseudo_labels


def test_ray_data_bookkeeping_lives_on_the_driver_node(sim: Sim) -> None:
    """Ray's cluster-wide detached actors (Ray Data's ActorLocationTracker and stats actors, the
    AutoscalingCoordinator that Ray Train's elastic groups and Ray Data ask for resources) stay for good on the
    node of the process that first asks for them. init_ray creates them from the driver, before any stage: a
    training worker's ingest or resize request on a worker node (as here, a task running an actor pool and
    asking the coordinator there) then finds them rather than creating them on that node, whose loss would fail
    every later actor pool or elastic group in the cluster. Runs first in the module: before it nothing has run
    a dataset or a fit, so without init_ray none of them would exist yet, and the task would create them."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    from wsss_ray.core.config_base import RayConfig
    from wsss_ray.core.ray_utils import CLUSTER_ACTORS, init_ray

    head = sim.cluster.head_node.node_id
    init_ray(RayConfig())  # joined already (the fixture's ray.init): only the pinning runs
    actors = {name: ray.get_actor(name, namespace=namespace) for _, _, name, namespace in CLUSTER_ACTORS}

    @ray.remote(num_cpus=1)
    def actor_pool_on_a_worker_node() -> str:
        class Identity:
            def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
                return batch

        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = ray.data.range(4).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
        assert len(rows) == 4
        get_or_create_autoscaling_coordinator()  # as Ray Train's controller and Ray Data's executor ask for it
        return ray.get_runtime_context().get_node_id()

    ran_on = ray.get(actor_pool_on_a_worker_node.remote())
    assert ran_on != head
    for name, actor in actors.items():
        located = ray._private.state.actors(actor_id=actor._actor_id.hex())["Address"]["NodeID"]
        assert located == head, f"Ray's {name} lives on {located}, not the driver's node {head}"


def test_pseudo_labels_survive_a_lost_node(sim: Sim, base: dict[str, Any], s3_server: Any) -> None:
    """A worker node running a CAM actor is killed mid-stage: Ray restarts the actor on the other node and retries
    the lost tasks; every image ends with one mask, byte-identical to the reference run, and one stats row."""
    records = base["records"]
    stage = StageDir.create(f"s3://{s3_server.bucket}/faults/node-lost", "pseudo_labels", "x")
    thread, out = in_thread(lambda: generate_pseudo_labels(records, stage, **pseudo_kwargs(base)))
    # The node is lost as soon as a started CAM actor lives on it (its constructor done: the title no longer ends
    # in __init__). Waiting for the first mask instead raced the stage: on 16 small images the actors can finish
    # every CAM, and Ray Data retire the pool, before the first CRF task has written anything.
    victim = sim.wait_for_node_running("CamActor))", thread.is_alive, 120, started=True)
    done_at_loss = len(pngs(stage))
    sim.lose_node(victim)
    try:
        thread.join(timeout=300)
        assert "error" not in out, out.get("error")
        lost, duplicated = check_pseudo(stage, out["result"], records, base["dirs"]["pseudo_labels"])
    finally:
        sim.add_node()  # the next tests start from two worker nodes again
    assert done_at_loss < len(records), "the stage was over before the node was lost"
    record("worker node lost (SIGKILL)", "pseudo_labels", f"completed ({done_at_loss}/{len(records)} done at loss)",
           lost, duplicated)


# ------------------------------------------------------------------------------------------------ 2. elastic


def _latest_state(stage: StageDir) -> dict[str, Any] | None:
    """The training state (history) of the run's latest *registered* checkpoint: Ray Train registers a checkpoint
    once every worker has reported it and records that in ``checkpoint_manager_snapshot.json``; a checkpoint
    uploaded but not yet registered when a node is lost is not resumed from, so its epoch is trained again."""
    snapshots = storage.list_files(stage.path("ray_train"), suffix="/checkpoint_manager_snapshot.json")
    if not snapshots:
        return None
    try:
        latest = storage.read_json(snapshots[0]).get("latest_checkpoint_result")
        if not latest:
            return None
        return storage.read_json(storage.join(snapshots[0].rsplit("/", 1)[0], latest["checkpoint_dir_name"],
                                              "state.json"))
    except ValueError:
        # Read while Ray Train overwrote it: pyarrow's S3 reader takes the size from a HEAD, then GETs that byte
        # range, so an object replaced in between comes back cut at the old size (seen once in a full-suite run).
        # The test polls files of a running fit; the next poll reads the new version whole.
        return None


def test_elastic_training_shrinks_and_grows(sim: Sim, base: dict[str, Any], s3_server: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """train_seg with workers.min_workers=1, num_workers=2 (one 2-CPU worker per node). A node is killed after the
    first checkpoint: the group restarts from it with the one worker that still fits. A node is added back: the
    group grows to two again (Ray Train V2 checks every ``elastic_resize_monitor_interval_s``, 60 s by default,
    shortened here to 1 s, once the autoscaling coordinator has seen the node: ``Sim.refresh_reservations``).
    Every epoch completes exactly once; the model is exported."""
    from wsss_ray.stages.train_seg import train_segmentation
    from wsss_ray.training import loop

    monkeypatch.setattr(loop, "ScalingConfig", partial(loop.ScalingConfig, elastic_resize_monitor_interval_s=1.0))
    config: PipelineConfig = base["config"]
    # Enough epochs left after the node is added for the group to grow (~3 s) before the run ends: a 1-worker
    # epoch of these 16 images takes ~1 s.
    epochs = 10
    seg = config.train_seg.model_copy(update={
        "epochs": epochs, "batch_size": 4, "val_every": 0,
        "workers": config.train_seg.workers.model_copy(update={"num_workers": 2, "min_workers": 1,
                                                              "max_failures": 3})})
    records = segmentation_records(base["records"], base["dirs"]["pseudo_labels"], config)
    stage = StageDir.create(f"s3://{s3_server.bucket}/faults/elastic", "train_seg", "x")
    thread, out = in_thread(lambda: train_segmentation(records, stage, seg, 21))

    def last_epoch() -> dict[str, Any]:
        return ((_latest_state(stage) or {}).get("history") or [{"epoch": 0}])[-1]

    # The group starts with what is free (Ray Data's ingest tasks may hold a node's spare CPUs at that moment),
    # so wait for an epoch run by two workers, one per node, whether from the start or after growing.
    wait_for(lambda: last_epoch().get("world_size") == 2, thread.is_alive, 240, "an epoch with two workers")
    victim = sim.node_running("RayTrainWorker")
    assert victim is not None
    lost_after = last_epoch()["epoch"]
    sim.lose_node(victim)
    wait_for(lambda: last_epoch()["epoch"] > lost_after and last_epoch().get("world_size") == 1,
             thread.is_alive, 240, "an epoch with one worker after the loss")
    sim.add_node()
    sim.refresh_reservations()
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    history = out["result"]["history"]
    sizes = [h["world_size"] for h in history]
    print(f"world size per epoch: {sizes} (node lost after epoch {lost_after}, added after the first 1)", flush=True)
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # resumed from checkpoints: each epoch once
    after = sizes[lost_after:]
    assert 2 in sizes[:lost_after] and 1 in after, sizes  # shrank when the node was lost
    assert 2 in after[after.index(1):], sizes  # grew back once a node was added
    assert storage.exists(out["result"]["model_uri"]) and len(out["result"]["model_sha256"]) == 64
    record("node lost, then one added", "train_seg (elastic 1-2 workers)", f"completed, world sizes {sizes}",
           epochs - len({h["epoch"] for h in history}), len(history) - len({h["epoch"] for h in history}))


# ------------------------------------------------------------------------------------------------ 3. sweep


def test_sweep_trial_survives_a_lost_node(sim: Sim, base: dict[str, Any], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two train_seg trials side by side (one per node); the node running the first trial's Train worker is
    killed after its first checkpoint. The trial's run restarts from that checkpoint on a node added in its
    place, and the sweep ends with both trials' results, in results.json too."""
    from wsss_ray.tuning.sweep import run_sweep

    monkeypatch.setenv("RAY_ADDRESS", sim.cluster.address)  # a sweep joins a running cluster (no dashboard here)
    raw = {**base["raw"], "train_seg": {**base["raw"]["train_seg"], "epochs": 2, "val_every": 1}}
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    space = tmp_path / "lost.yaml"
    space.write_text(yaml.safe_dump({"name": "lost", "base_config": str(cfg), "trial": "train_seg",
                                     "metric": "val_miou", "scheduler": "fifo",
                                     "params": {"train_seg.loss.label_smoothing": {"grid": [0.0, 0.1]}}}))
    sweep_uri = storage.join(raw["output"], "sweeps", "lost")
    thread, out = in_thread(lambda: run_sweep(space))

    def checkpointed() -> bool:
        return any(u.endswith("/state.json") for u in storage.list_files(storage.join(sweep_uri, "trials")))

    wait_for(checkpointed, thread.is_alive, 240, "a trial's first checkpoint")
    victim = sim.node_running("RayTrainWorker")
    assert victim is not None
    sim.lose_node(victim)
    sim.add_node()
    thread.join(timeout=400)
    assert "error" not in out, out.get("error")
    results = out["result"]
    stored = storage.read_json(storage.join(sweep_uri, "results.json"))
    assert len(results["trials"]) == 2
    for trial in results["trials"]:
        assert trial["status"] == "TERMINATED" and trial["epochs"] == 2, trial
        assert [row["epoch"] for row in trial["history"]] == [1, 2]
        assert storage.exists(storage.join(trial["uri"], "model.pt"))
        summary = storage.read_json(storage.join(trial["uri"], "summary.json"))
        assert [h["epoch"] for h in summary["history"]] == [1, 2]  # the run's own history: each epoch once
    assert [(t["id"], t["metric"], t["epochs"]) for t in stored["trials"]] == \
        [(t["id"], t["metric"], t["epochs"]) for t in results["trials"]]
    # Resumed, not started over: each trial's reported epochs (Tune's result log, every report kept) never go
    # back to 1 once past it; a kill between an upload and its report may repeat one epoch.
    restarted = 0
    for uri in storage.list_files(sweep_uri, suffix="/result.json"):
        if "/trials/" in uri:
            continue
        epochs = [int(json.loads(line)["epoch"]) for line in storage.read_text(uri).splitlines() if line.strip()]
        assert epochs and epochs[-1] == 2 and all(b >= a - 1 for a, b in itertools.pairwise(epochs)), (uri, epochs)
        assert epochs.count(1) == 1, (uri, epochs)
        restarted += len(epochs) > 2
    record("node running a trial lost", "sweep (train_seg trials)",
           f"completed, {restarted} trial(s) repeated an epoch", 0, 0)


# ------------------------------------------------------------------------------------------------ 4. S3 outage


def test_s3_outage_is_retried_and_a_long_one_fails_clearly(sim: Sim, base: dict[str, Any], s3_server: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 endpoint goes away for 2 s mid training: requests retry with backoff and the stage completes with
    nothing lost or duplicated. An outage past the retry budget stops pseudo-labelling with an error naming the
    URI; the rerun resumes from the stored stats rows and, through a 2 s outage of its own, completes."""
    import wsss_ray.stages.pseudo_labels as pseudo_stage
    from wsss_ray.stages.train_seg import train_segmentation

    records = base["records"]
    prefix = f"s3://{s3_server.bucket}/faults/outage"
    before = sim.proxy.connections

    # -- short outage, train_seg (checkpoint and TensorBoard uploads every epoch)
    config: PipelineConfig = base["config"]
    seg = config.train_seg.model_copy(update={"epochs": 3, "val_every": 0})
    seg_records = segmentation_records(records, base["dirs"]["pseudo_labels"], config)
    train_stage = StageDir.create(prefix, "train_seg", "short")
    thread, out = in_thread(lambda: train_segmentation(seg_records, train_stage, seg, 21))
    wait_for(lambda: _latest_state(train_stage) is not None, thread.is_alive, 180, "the first checkpoint")
    sim.proxy.down()
    time.sleep(2.0)
    sim.proxy.up()
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    history = out["result"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert storage.exists(out["result"]["model_uri"])
    record("S3 unreachable 2 s", "train_seg", "completed (retried)", 3 - len(history), 0)
    assert sim.proxy.connections > before  # the clients really went through the proxy

    # -- an outage past the budget, pseudo_labels: flush stats every 4 rows so that some are stored before it
    monkeypatch.setattr(pseudo_stage, "STATS_FLUSH_ROWS", 4)
    stage = StageDir.create(prefix, "pseudo_labels", "long")
    thread, out = in_thread(lambda: generate_pseudo_labels(records, stage, **pseudo_kwargs(base)))
    wait_for(lambda: len(raw_stats_ids(stage)) >= 4, thread.is_alive, 120, "the first stored stats rows")
    sim.proxy.down()
    started = time.monotonic()
    try:
        thread.join(timeout=240)
    finally:
        sim.proxy.up()
    failed_after = time.monotonic() - started
    assert not thread.is_alive(), "the stage did not give up during a 4-minute outage"
    error = out.get("error")
    assert error is not None, "the stage completed although S3 was unreachable"
    message = str(error)
    # Which request gives up first (reading an input image, writing a mask) varies: any URI of the run's data.
    assert "StorageError" in message, message[-2000:]
    assert re.search(r"s3://wsss-test/faults/\S+: cannot \w+", message), message[-2000:]
    done_before = set(raw_stats_ids(stage))
    assert 4 <= len(done_before) < len(records)

    # -- the rerun, with a short outage mid-way: it resumes, retries through the outage and completes
    # The outage starts at the rerun's first mask of an image the failed run never wrote, while the rerun is
    # still running: it cannot finish without S3 (its masks, stats and summary are stored there).
    masks_before = set(pngs(stage))
    thread, out = in_thread(lambda: generate_pseudo_labels(records, stage, **pseudo_kwargs(base)))
    wait_for(lambda: bool(set(pngs(stage)) - masks_before), thread.is_alive, 120, "the rerun's first new mask")
    assert thread.is_alive(), "the rerun was over before the outage"
    sim.proxy.down()
    time.sleep(2.0)
    sim.proxy.up()
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    lost, duplicated = check_pseudo(stage, out["result"], records, base["dirs"]["pseudo_labels"])
    record("S3 unreachable 2 s", "pseudo_labels (the rerun)", "completed (retried)", lost, duplicated)
    uri = re.search(r"s3://\S+?: cannot \w+", message)
    record(f"S3 unreachable > budget (failed after {failed_after:.0f} s)", "pseudo_labels",
           f"clear error ({uri.group(0) if uri else '?'}); rerun resumed ({len(done_before)} done)", lost, duplicated)


# ------------------------------------------------------------------------------------------------ 5. driver


def copy_tree(src: str, dst: str) -> None:
    for uri in storage.list_files(src):
        storage.write_bytes(storage.join(dst, uri[len(src):]), storage.read_bytes(uri))


def test_killed_driver_reruns_to_the_same_outputs(sim: Sim, base: dict[str, Any], s3_server: Any,
                                                  tmp_path: Path) -> None:
    """SIGKILL ``wsss-ray run`` (a subprocess joined to the cluster through RAY_ADDRESS) mid pseudo-labelling, then
    run the same command again. The rerun skips ingest and train_cls, redoes pseudo_labels and runs the rest:
    byte-identical masks, and (same seed, worker count and CPUs per worker, on CPU) the same segmentation weights
    and metrics as the uninterrupted reference run. To save time the run's output starts with the reference's
    finished ingest and train_cls folders (what a first attempt would have left there). The kill lands in
    pseudo_labels, the stage whose partial outputs a rerun must pick up; a kill during training resumes from a
    checkpoint, which the elastic test covers."""
    output = f"s3://{s3_server.bucket}/faults/driver"
    ref = base["dirs"]
    for name in ("ingest", "train_cls"):
        copy_tree(ref[name].uri, storage.join(output, ref[name].uri.rsplit("/", 1)[-1]))
    raw = {**base["raw"], "output": output}
    config = parse_config(raw, source="driver")
    dirs = stage_dirs(config)
    assert dirs["train_cls"].is_complete() and not dirs["pseudo_labels"].is_complete()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "wsss_ray.cli", "run", "--config", str(cfg)]
    env = {**os.environ, "RAY_ADDRESS": sim.cluster.address, "PYTHONPATH": str(REPO)}
    log = (tmp_path / "first.log").open("w")
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(lambda: bool(pngs(dirs["pseudo_labels"])), lambda: child.poll() is None, 300, "the first mask")
        done_at_kill = len(pngs(dirs["pseudo_labels"]))
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        log.close()
    assert not storage.exists(storage.join(output, "metrics.json"))
    assert not dirs["pseudo_labels"].is_complete()
    again = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[train_cls] already complete" in again.stderr, again.stderr[-3000:]  # progress lines: stderr
    assert dirs["pseudo_labels"].name == ref["pseudo_labels"].name and dirs["train_seg"].name == ref["train_seg"].name
    assert dirs["pseudo_labels"].is_complete()
    lost, duplicated = check_pseudo(dirs["pseudo_labels"], dirs["pseudo_labels"].summary(), base["records"],
                                    ref["pseudo_labels"])
    model = storage.read_bytes(dirs["train_seg"].path("model.pt"))
    assert model == storage.read_bytes(ref["train_seg"].path("model.pt")), "segmentation weights differ"
    metrics = storage.read_json(storage.join(output, "metrics.json"))
    reference = storage.read_json(storage.join(base["raw"]["output"], "metrics.json"))
    # The same stages (folder names are config hashes) and scores; only the timings and the output root differ.
    for run in (metrics, reference):
        run.pop("stage_seconds")
        run["stage_uris"] = {stage: uri.rsplit("/", 1)[-1] for stage, uri in run["stage_uris"].items()}
    assert metrics == reference
    record("driver SIGKILLed", "pipeline (in pseudo_labels)",
           f"rerun resumed ({done_at_kill}/{len(base['records'])} masks at kill): same masks, model, metrics",
           lost, duplicated)


# ------------------------------------------------------------------------------------------------ 6. node added


def test_added_node_gets_pseudo_labelling_work(sim: Sim, base: dict[str, Any], s3_server: Any) -> None:
    """A node added mid-stage runs some of the stage's tasks (its Ray workers' process titles name them); the
    stage still ends with one mask and one stats row per image, byte-identical to the reference run's.
    Reports images/s before and after the node joined."""
    records = base["records"]
    stage = StageDir.create(f"s3://{s3_server.bucket}/faults/node-added", "pseudo_labels", "x")
    thread, out = in_thread(lambda: generate_pseudo_labels(records, stage, **pseudo_kwargs(base)))
    wait_for(lambda: bool(pngs(stage)), thread.is_alive, 120, "the first mask")
    t0, n0 = time.monotonic(), len(pngs(stage))
    node = sim.add_node()
    t1, n1 = time.monotonic(), len(pngs(stage))
    seen: set[str] = set()
    while thread.is_alive():
        seen.update(t.split()[0] for t in node_titles(node) if "refine_and_write" in t or "CamActor" in t)
        time.sleep(0.1)
    t2, n2 = time.monotonic(), len(records)
    assert "error" not in out, out.get("error")
    lost, duplicated = check_pseudo(stage, out["result"], records, base["dirs"]["pseudo_labels"])
    before = (n1 - n0) / max(t1 - t0, 1e-9)
    after = (n2 - n1) / max(t2 - t1, 1e-9)
    print(f"images/s while the node joined: {before:.2f}, after it joined: {after:.2f} "
          f"(stage mean {out['result']['images_per_s']}); tasks seen on the new node: {sorted(seen)}", flush=True)
    sim.cluster.remove_node(node)
    assert seen, "the added node ran none of the stage's tasks"
    record("node added", "pseudo_labels", f"new node ran {sorted(seen)}; images/s {before:.2f} -> {after:.2f}",
           lost, duplicated)
