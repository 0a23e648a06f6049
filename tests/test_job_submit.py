"""``ray job submit`` against a real head started with ``ray start --head --block``, outputs on the loopback S3.

This is how the pipeline runs on a cluster (README "Submitting to a Ray cluster"): the repository is uploaded as
the job's working dir with jobs/runtime_env.yaml, and the entrypoints in jobs/ import the package from it. The
test submits one per-stage entrypoint (jobs/ingest.py) and then jobs/run_pipeline.py, which must skip the
ingest stage the first job finished, and checks every stage's outputs in S3.

Token auth is on, as a production head should run: ``HOME`` is a temp dir, where ``ray get-auth-token --generate``
writes the token (``ray start`` with ``RAY_AUTH_MODE=token`` refuses to start without one, and without the mode
it quietly starts with auth off), so the real home is never touched. The head and every CLI call get that
``HOME`` plus ``RAY_AUTH_MODE=token`` (without it the CLI fails with ``AuthenticationError``); the job's driver
inherits both from the head's processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import ray_temp_dir, tiny_pipeline

from wsss_ray.core import storage
from wsss_ray.pipeline import STAGES, stage_dirs
from wsss_ray.pipeline_config import load_config

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
# The venv's own CLI: the test may run without the venv's bin/ on PATH.
VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RayHead:
    """A running head: the dashboard address jobs are submitted to, and the environment CLI calls need."""

    address: str
    env: dict[str, str] = field(repr=False)  # the whole environment: too long for a failure's traceback
    temp_dir: str


def _ray(head: RayHead, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the ``ray`` CLI against ``head``; output is captured and echoed so a failing job's log shows up."""
    # check=False: callers assert on the exit code themselves, with the job's output in the message.
    result = subprocess.run([RAY_CLI, *args], check=False, env=head.env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout)
    print(f"$ ray {' '.join(args)}  (exit {result.returncode})\n{result.stdout}\n{result.stderr}")
    return result


def _wait_for_job_api(dashboard: str, token_file: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll the dashboard's job API (not just /api/version: the job module may answer a little later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode} before the dashboard came up")
        if token_file.exists():
            request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={
                "Authorization": f"Bearer {token_file.read_text().strip()}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {dashboard} did not answer within {timeout:.0f}s")


def _processes_using(temp_dir: str) -> list[psutil.Process]:
    """Processes of this head only: every Ray process it starts names its (unique) temp dir on its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _stop_head(proc: subprocess.Popen[bytes], temp_dir: str) -> None:
    """SIGTERM the ``--block`` process (it drains its children), SIGKILL after a timeout. Never ``ray stop``,
    which would kill every Ray process on the machine, other people's clusters included."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    # Anything the head left behind is still recognisably ours by its temp dir: end those PIDs only.
    leftovers = _processes_using(temp_dir)
    for leftover in leftovers:
        leftover.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=15)
    for leftover in alive:
        leftover.kill()


@pytest.fixture(scope="module")
def ray_head(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """``ray start --head --block`` on loopback with 2 CPUs; requested after ``s3_server`` so the head's
    processes (and so the job's driver and workers) inherit the AWS variables pointing at the test S3."""
    home = tmp_path_factory.mktemp("ray-home")
    # Short and fresh: Ray's socket paths have a length limit, and no stale ray_current_cluster may be found.
    temp_dir = ray_temp_dir()
    port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1",
           # On SIGTERM `ray start --block` first drains the node (for Serve replicas on Kubernetes), waiting up
           # to 30 s for every lease to be returned; the jobs' detached actors never return theirs, so the
           # teardown sat out the whole 30 s. Nothing here needs draining: stop at once.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # The job's entrypoint is a shell command: `python` must be the venv's, as on a cluster image.
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)  # a caller's cluster or token must not leak into this private one
    generated = subprocess.run([RAY_CLI, "get-auth-token", "--generate"], check=False, env=env, capture_output=True,
                               text=True, timeout=60)
    assert generated.returncode == 0 and (home / ".ray" / "auth_token").exists(), generated.stderr
    log_path = home / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [RAY_CLI, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             "--include-dashboard=true", f"--port={port}", f"--dashboard-port={dashboard_port}",
             # The session's local test cluster (conftest's ray_cluster) already holds Ray's default agent
             # ports (52365 and friends); a second head on the same ports gets no job agent ("No available
             # agent to submit job"), so every agent port of this head is a free one.
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
             f"--temp-dir={temp_dir}", "--block"],
            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        try:
            _wait_for_job_api(dashboard, home / ".ray" / "auth_token", proc, timeout=90)
        except (RuntimeError, TimeoutError):
            print(log_path.read_text(errors="replace"))
            raise
        yield RayHead(address=dashboard, env=env, temp_dir=temp_dir)
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_config(tmp_path: Path) -> Path:
    """A tiny run (conftest's tiny_pipeline, the reference run's sizes) on a dataset the driver generates locally.

    The config and the dataset are absolute /tmp paths: on a local head the driver and the tasks share this
    machine's disk. ``output`` is set with ``--set`` on submit. ``ray`` is left empty on purpose: the driver
    joins the head through RAY_ADDRESS, and ``ray.num_cpus`` would fail against an existing cluster.
    """
    # no default output: a submit that forgot --set output=... fails loudly
    config = {**tiny_pipeline(str(tmp_path / "toy-voc"), "${WSSS_TEST_OUTPUT}"), "name": "job-submit"}
    config["dataset"]["generate"] = {"num_train": 16, "num_val": 6, "image_size": 64, "num_classes": 3, "seed": 3}
    path = tmp_path / "job-submit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _submit(head: RayHead, script: str, config: Path, output: str, timeout: float) -> str:
    """Submit ``python jobs/<script>`` with the repository as working dir; returns the job's submission id.

    jobs/runtime_env.yaml is used as is: its REPLACE_ME env vars (VOC_ROOT, WSSS_OUTPUT) are only read by
    jobs/configs/voc.yaml, never by this test's config, so they are harmless here. The CLI's --working-dir
    overrides the file's relative ``working_dir: "."``.
    """
    # The head's job agent registers a few seconds after the dashboard answers; until then a submission is
    # refused with "No available agent" before any job exists, so only that refusal is retried.
    deadline = time.monotonic() + 90
    while True:
        job_id = f"wsss-{Path(script).stem}-{uuid.uuid4().hex[:8]}"
        result = _ray(head, "job", "submit", "--address", head.address, "--submission-id", job_id,
                      "--working-dir", str(REPO_ROOT), "--runtime-env", str(REPO_ROOT / "jobs" / "runtime_env.yaml"),
                      # jobs/runtime_env.yaml is for the project's autoscaling clusters (WSSS_AUTOSCALING=1: GPU
                      # groups wait for GPU nodes); this head has no autoscaler, which the config says, as a user
                      # submitting to a fixed cluster would.
                      "--", "python", script, "--config", str(config), "--set", f"output={output}",
                      "--set", "ray.autoscaling=false", timeout=timeout)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    # `ray job submit` streams the job's log until it exits and exits 1 unless the job succeeded.
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    status = _ray(head, "job", "status", "--address", head.address, job_id, timeout=60)
    # Its last line reads "Job '<id>' succeeded" (the SUCCEEDED status, worded for people).
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    return job_id


def test_submitted_jobs_run_the_pipeline_on_s3(ray_head: RayHead, s3_prefix: str, tmp_path: Path) -> None:
    config_path = _write_config(tmp_path)
    overrides = [f"output={s3_prefix}"]
    config = load_config(config_path, overrides)
    assert config.ray.num_cpus is None and config.ray.address is None

    # Timeouts are generous: on 2 idle cores the two jobs take ~2 min, but these cores are often shared.
    # One per-stage entrypoint: ingest only (the dataset is generated by the job's driver first).
    _submit(ray_head, "jobs/ingest.py", config_path, s3_prefix, timeout=240)
    dirs = stage_dirs(config)
    assert dirs["ingest"].is_complete() and not dirs["train_cls"].is_complete()
    ingest_summary = storage.read_json(dirs["ingest"].path("_SUCCESS.json"))
    assert ingest_summary["per_split"] == {"train": 16, "val": 6}

    # The whole pipeline: ingest is skipped (same summary), every later stage runs on the head's workers.
    _submit(ray_head, "jobs/run_pipeline.py", config_path, s3_prefix, timeout=600)
    dirs = stage_dirs(config)  # re-keyed by the trained weights
    for name in STAGES:
        assert dirs[name].uri.startswith(f"{s3_prefix}/"), name
        assert storage.exists(dirs[name].path("_SUCCESS.json")), name
    assert storage.read_json(dirs["ingest"].path("_SUCCESS.json")) == ingest_summary

    metrics: dict[str, Any] = storage.read_json(storage.join(s3_prefix, "metrics.json"))
    assert 0.0 <= metrics["val_miou"] <= 1.0
    assert metrics["stage_uris"] == {name: stage.uri for name, stage in dirs.items()}
    report_uri = storage.read_json(dirs["evaluate"].path("_SUCCESS.json"))["report_uri"]
    assert report_uri.startswith(f"{dirs['evaluate'].uri}/")
    report = storage.read_text(report_uri)
    assert "IoU per class" in report
    print(json.dumps({k: metrics[k] for k in ("val_miou", "stage_seconds")}, indent=1))
