"""Shared fixtures. The S3 server is moto's real HTTP endpoint, in-process, bound to loopback only.

Ray, moto and boto3 are imported inside the fixtures that use them, so the pure tests need none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would otherwise redirect or re-authenticate the S3 client away from the test server.
_S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE")


# Ray's AF_UNIX socket paths must stay under the kernel's 107 characters. The longest lies 76 below a cluster's
# temp dir (/session_<date>_<time>_<usec>_<pid>/sockets/dash_PlatformEventsHead), so a cluster's temp dir is at
# most 31 long: <base>/wXXXXXXXX/cXXXXXXXX leaves 11 for the base. A longer TMPDIR (a CI's fresh mktemp -d)
# gets the session's Ray root under /tmp instead: still a folder this session makes and removes.
_MAX_TEMP_BASE = 11
TEST_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "RAY_enable_metrics_collection": "0", "RAY_USAGE_STATS_ENABLED": "0"}
_SESSION_ROOT: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Give this test session a Ray temp root of its own, made here, before anything can start Ray.

    Ray writes ``<RAY_TMPDIR, else TMPDIR, else /tmp>/ray/ray_current_cluster`` even for a cluster given its own
    temp dir (``ray.cluster_utils.Cluster``, ``ray start``): on a machine where Ray never ran that folder does not
    exist and the write fails; where it does exist, it is shared with every other Ray on the machine. Pointing
    ``RAY_TMPDIR`` at a folder this session creates (and removes) means the tests read and write no Ray state they
    did not make. Subprocesses (``ray start``, ``wsss-ray`` CLI runs) inherit it.
    """
    global _SESSION_ROOT
    base = tempfile.gettempdir()
    if len(base) > _MAX_TEMP_BASE:  # a deep TMPDIR would push Ray's socket paths past the kernel's limit
        base = "/tmp"
    _SESSION_ROOT = Path(tempfile.mkdtemp(prefix="w", dir=base))
    (_SESSION_ROOT / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(_SESSION_ROOT)
    # Test-only Ray settings, inherited by every cluster the tests start (the library keeps Ray's defaults):
    # the controller polls its workers every 0.5 s instead of 2 s, so each of the suite's ~50 short fits ends (and
    # a lost worker is noticed) sooner; no preemption watcher actor per fit, since nothing drains the tests'
    # nodes (it is one more process to start per fit on 2 cores); and no metrics recording or usage reporting in
    # every Ray process (no test reads them; ~10 % of a short fit's CPU on 2 cores in two paired runs).
    for name, value in TEST_RAY_ENV.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_ROOT is not None:
        shutil.rmtree(_SESSION_ROOT, ignore_errors=True)


def ray_temp_dir() -> str:
    """A fresh, short temp dir for one Ray cluster (head ``temp_dir``), inside this session's Ray root."""
    assert _SESSION_ROOT is not None, "pytest_configure has not run"
    return tempfile.mkdtemp(prefix="c", dir=_SESSION_ROOT)


@dataclass(frozen=True)
class S3Server:
    """A running test S3 endpoint (``http://127.0.0.1:PORT``) with one empty-at-start bucket."""

    endpoint: str
    bucket: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port; the AWS env vars point at it (restored afterwards)."""
    import boto3
    import moto.server as moto_server

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    names = (*_S3_ENV, "AWS_ENDPOINT_URL", *_S3_ENV_CLEARED)
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in _S3_ENV_CLEARED:
            os.environ.pop(name, None)
        os.environ.update(_S3_ENV, AWS_ENDPOINT_URL=endpoint)
        bucket = "wsss-test"
        client = boto3.client("s3", endpoint_url=endpoint, region_name=_S3_ENV["AWS_DEFAULT_REGION"],
                              aws_access_key_id=_S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=_S3_ENV["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=bucket)
        yield S3Server(endpoint=endpoint, bucket=bucket)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh, empty ``s3://bucket/<uuid>`` prefix."""
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[None]:
    """A real local Ray cluster with 2 CPUs, started after the S3 variables are set so its workers inherit them.

    Token auth is switched off for this private test cluster, and Ray's temp dir is a short fresh folder of the
    session's own (socket paths have a length limit, and a stale ``ray_current_cluster`` must not be picked up).
    """
    import ray

    from wsss_ray.core.ray_utils import pin_state_api, quiet_ray_logging

    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = ray_temp_dir()
    # The state API pinned to this cluster's dashboard: other Ray clusters on the machine must not confuse
    # Ray Train's placement-group cleaner (see wsss_ray.core.ray_utils.pin_state_api).
    # As the CLI's default console (init_ray without --verbose): workers' output stays in Ray's log files and
    # Ray's driver-side loggers show errors only, so tests can check what a person sees.
    quiet_ray_logging(verbose=False)
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=pin_state_api(), _temp_dir=temp_dir, log_to_driver=False)
    quiet_ray_logging(verbose=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def tiny_pipeline(root: str, output: str) -> dict[str, Any]:
    """The tiny pipeline config (resnet_tiny, 64 px, 2 epochs, two 0.5-CPU workers) the reference run uses.
    Every section is its own dict (nothing shared), so callers may change one and YAML dumps have no anchors."""

    def small_backbone() -> dict[str, Any]:
        return {"name": "resnet_tiny", "output_stride": 16}

    def workers() -> dict[str, Any]:
        return {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0}

    def augment() -> dict[str, Any]:
        return {"crop_size": 64, "scale_min": 0.9, "scale_max": 1.1}

    return {
        "name": "tiny",
        "output": output,
        "dataset": {"format": "voc", "root": root, "train_split": "train", "val_split": "val"},
        "train_cls": {"backbone": small_backbone(), "epochs": 2, "batch_size": 4, "workers": workers(),
                      "augment": augment()},
        "pseudo_labels": {"generator": {"scales": [1.0], "bg_score": 0.2}},
        "train_seg": {"model": {"backbone": small_backbone(), "aspp_channels": 16}, "epochs": 2, "batch_size": 4,
                      "workers": workers(), "augment": augment()},
        "evaluate": {"num_samples": 2},
    }


@pytest.fixture(scope="session")
def reference_pipeline(ray_cluster: None, s3_server: S3Server,
                       tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run of the whole pipeline, dataset and outputs on the loopback S3, made once per session.

    Generated VOC data (16 train, 6 val) with one truncated JPEG, which must be reported and skipped. test_pipeline
    checks its outputs and console; test_sweep's base config shares its dataset, classifier and pseudo-label
    sections and output, so the sweeps' shared inputs are these very stages (skipped there as finished).
    """
    from wsss_ray.core import storage
    from wsss_ray.data.toy import make_toy_dataset
    from wsss_ray.pipeline import run_pipeline
    from wsss_ray.pipeline_config import parse_config

    data = tmp_path_factory.mktemp("toy")
    make_toy_dataset(str(data), fmt="voc", num_train=16, num_val=6, image_size=64, num_classes=3, seed=3)
    ids = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    corrupt = ids[5]
    jpeg = data / "JPEGImages" / f"{corrupt}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated: must be reported and skipped, not fatal
    root = f"s3://{s3_server.bucket}/datasets/toy"
    storage.upload_dir(str(data), root)
    sections = tiny_pipeline(root, f"s3://{s3_server.bucket}/runs/tiny")
    config = parse_config(sections, source="tiny")
    start = time.monotonic()
    with console_output() as console:
        summaries = run_pipeline(config)
    first = time.monotonic() - start
    return {"config": config, "sections": sections, "summaries": summaries, "corrupt": corrupt, "seconds": first,
            "ids": ids, "console": console["text"]}


@contextlib.contextmanager
def console_output() -> Iterator[dict[str, str]]:
    """What the process writes to its stdout and stderr file descriptors meanwhile (Ray's log monitor too),
    in ``["text"]`` once the block has ended."""
    captured: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "console.txt"
        saved = [os.dup(1), os.dup(2)]
        # Both levels: the file descriptors (what Ray's log monitor and C++ write) and sys.stdout/sys.stderr,
        # which pytest's capture replaces with objects that bypass the descriptors. Append mode: one file, two
        # writers, no overwriting.
        with path.open("ab") as sink, path.open("a", buffering=1, errors="replace") as text, \
                contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            sys.__stdout__.flush()
            sys.__stderr__.flush()
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                text.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
        captured["text"] = path.read_text(errors="replace")
        sys.stderr.write(captured["text"])  # still shown by pytest on a failure


# Under pytest-xdist (``make test`` runs ``-n 2``) each group below runs whole in one worker process, so a module's
# fixtures (a trained toy model, a Ray cluster of its own) are built once. The suite spends much of its time
# waiting on Ray (process starts, health checks, polling), so two workers on two cores overlap one module's waiting
# with another's work. Groups are modules, except that the modules reading the session's reference pipeline share
# one, so it is made once.
_SHARED_GROUPS = {"test_pipeline": "reference", "test_sweep": "reference"}
# Longest first (``--durations=0`` of a serial run, seconds per group): a long group started last would leave the
# other worker idle at the end. Groups not listed follow in file order. The faults group must come first: it
# connects its worker to a multi-node cluster of its own, which must not overlap the session ``ray_cluster``.
_LONGEST_FIRST = ("test_faults", "reference", "test_training_methods", "test_job_submit", "test_generators_ray",
                  "test_predict", "test_stages", "test_adding_a_method", "test_first_epoch", "test_resources")


def test_group(nodeid: str) -> str:
    """The group a test runs in: its module's name, or the group that module shares."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return _SHARED_GROUPS.get(module, module)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests longest group first, the ``faults`` tests at the very start. Run serially (``-n 0``), this
    keeps the faults cluster before the session ``ray_cluster`` (one Ray driver per process; ray_cluster lives
    until the session ends); under xdist the faults group is the first one handed out, so it is its worker's first.
    """
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(test_group(item.nodeid), len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Hand out whole groups (``test_group``), in collection order. xdist's own ``--dist loadgroup`` needs a mark
    per test and, with pytest 9, does not see it (it renames ``item._nodeid``, which pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return test_group(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order made above
    return GroupScheduling(config, log)


def kill_worker_when(marker: str, ready: Callable[[], bool], running: Callable[[], bool],
                     timeout_s: float) -> list[int]:
    """SIGKILL one Ray worker process whose command line holds ``marker`` once ``ready()``, while ``running()``.

    Only this test session's cluster is touched: its processes descend from this one (other Ray clusters may
    run beside the tests on the same machine). Returns the killed PIDs (empty when the work ended first).
    """
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        if ready():
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = " ".join(proc.cmdline())
                except psutil.Error:  # exited meanwhile
                    continue
                if marker in cmdline:
                    proc.kill()
                    return [proc.pid]
        time.sleep(0.05)
    return []
