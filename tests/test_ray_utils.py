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
