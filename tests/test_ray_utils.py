"""The thin Ray layer's helpers that need no cluster."""

from __future__ import annotations

import socket

import pytest

from wsss_ray.core import ray_utils
from wsss_ray.stages.pseudo_labels import images_per_task


def test_pin_state_api_points_clients_at_a_free_local_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_utils.API_SERVER_ADDRESS_VAR, raising=False)
    monkeypatch.setattr(ray_utils, "_PINNED_ADDRESS", None)
    port = ray_utils.pin_state_api()
    assert ray_utils.os.environ[ray_utils.API_SERVER_ADDRESS_VAR] == f"http://127.0.0.1:{port}"
    with socket.socket() as free:  # the chosen port is free to bind for the dashboard
        free.bind(("127.0.0.1", port))
    # a second local cluster in the same process gets its own port, not the stale one
    again = ray_utils.pin_state_api()
    assert ray_utils.os.environ[ray_utils.API_SERVER_ADDRESS_VAR] == f"http://127.0.0.1:{again}"


def test_pin_state_api_keeps_an_address_the_user_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_utils, "_PINNED_ADDRESS", None)
    monkeypatch.setenv(ray_utils.API_SERVER_ADDRESS_VAR, "http://127.0.0.1:8299")
    assert ray_utils.pin_state_api() == 8299
    assert ray_utils.os.environ[ray_utils.API_SERVER_ADDRESS_VAR] == "http://127.0.0.1:8299"


@pytest.mark.parametrize(("images", "cpus", "expected"), [
    (1, 2, 1), (7, 2, 1), (24, 2, 3), (96, 2, 12), (96, 1, 16), (2000, 2, 16), (10_000, 64, 16), (5, 0, 1)])
def test_images_per_task_amortises_scheduling_but_keeps_every_cpu_busy(images: int, cpus: int,
                                                                        expected: int) -> None:
    assert images_per_task(images, cpus) == expected


@pytest.mark.parametrize("verbose", [False, True])
def test_init_ray_keeps_ray_logs_off_the_console_unless_verbose(monkeypatch: pytest.MonkeyPatch,
                                                                verbose: bool) -> None:
    import logging

    from wsss_ray.core.config_base import RayConfig

    calls: list[dict[str, object]] = []

    class Context:
        dashboard_url = None

    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", lambda **kwargs: calls.append(kwargs) or Context())
    # no cluster behind the fake init for Ray's driver-pinned actors; where they live is test_faults' to show
    pinned: list[bool] = []
    monkeypatch.setattr(ray_utils, "pin_cluster_actors", lambda: pinned.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in (None, "ray://head:10001"):
        ray_utils.init_ray(RayConfig(address=address, include_dashboard=False), verbose=verbose)
    level = logging.INFO if verbose else logging.ERROR
    # a local cluster and a remote one
    assert [(call["log_to_driver"], call["logging_level"]) for call in calls] == [(verbose, level)] * 2
    assert pinned == [True, True]
    assert all(logging.getLogger(name).level == level for name in ray_utils.RAY_LOGGERS)
    ray_utils.quiet_ray_logging(verbose=False)


def test_progress_line_has_throughput_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss_ray.core import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = progress.Progress("stage", 12)
    now[0] = 130.0  # 30 s later, 3 of 12 done: 0.1/s, 9 left → 90 s
    bar.done = 3
    assert bar.line() == "[stage] 3/12 images (25%), 0.10 images/s, ETA 1m30s, 30s"
    assert progress.format_duration(3725) == "1h02m"


def test_epoch_line() -> None:
    from wsss_ray.training.console import epoch_line

    metrics = {"epoch": 3, "loss": 0.5712, "val_miou": 0.2744, "images_per_s": 8.04}
    # 3 epochs in 60 s of this run → 20 s each, 9 epochs left
    assert epoch_line(metrics, 12, 3, 60.0) == "epoch 3/12: loss 0.571, val mIoU 27.4, 8.0 images/s, ETA 3m00s"
    assert epoch_line({"epoch": 12, "loss": 0.1}, 12, 1, 5.0) == "epoch 12/12: loss 0.1, last epoch"
    # the share of the epoch spent waiting on the input, from a tenth on
    assert epoch_line({**metrics, "data_wait": 0.349}, 12, 3, 60.0) == \
        "epoch 3/12: loss 0.571, val mIoU 27.4, 8.0 images/s, 35% waiting on input, ETA 3m00s"
    assert epoch_line({**metrics, "data_wait": 0.05}, 12, 3, 60.0).endswith("8.0 images/s, ETA 3m00s")


@pytest.mark.parametrize(("argv", "verbose"), [(["run"], False), (["run", "--verbose"], True),
                                               (["train-seg", "--verbose"], True)])
def test_cli_verbose_reaches_the_pipeline(monkeypatch: pytest.MonkeyPatch, argv: list[str], verbose: bool) -> None:
    from pathlib import Path

    from wsss_ray import cli, pipeline

    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, until, verbose: seen.append((until, verbose)))
    config = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml")
    assert cli.main([*argv, "--config", config]) == 0
    assert seen == [("evaluate" if argv[0] == "run" else "train_seg", verbose)]


def test_epoch_console_survives_a_lost_queue() -> None:
    """The epoch-line queue's actor can die with its node; the callback runs in Ray Train's controller, where an
    exception would fail the whole run. It drops the lines instead (the faults tests lose that node for real)."""
    from wsss_ray.training.console import EpochConsole

    class LostQueue:
        calls = 0

        def put(self, item: str) -> None:
            LostQueue.calls += 1
            raise RuntimeError("ActorDiedError: the actor died because its node has died")

    console = EpochConsole(4, LostQueue())  # type: ignore[arg-type]
    for epoch in (1, 2):
        console.after_report(None, [{"epoch": epoch, "loss": 1.0}], None)
    assert LostQueue.calls == 1 and console.queue is None and console.epochs_run == 2


def test_a_job_drivers_forwarded_env_leaves_out_what_the_job_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray refuses a driver runtime env that sets a variable the submitted job's runtime env sets too (seen with
    WSSS_AUTOSCALING from jobs/runtime_env.yaml); outside a job nothing is left out."""
    import json

    from wsss_ray.core import ray_utils

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_utils._job_env_vars() == set()
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"WSSS_AUTOSCALING": "1", "VOC_ROOT": "s3://b"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert ray_utils._job_env_vars() == {"WSSS_AUTOSCALING", "VOC_ROOT"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert ray_utils._job_env_vars() == set()
