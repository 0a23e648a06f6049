"""The thin layer between wsss-ray and Ray: connecting, and sizing actor pools to the cluster."""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket

import ray
from ray.data import ActorPoolStrategy

from wsss_ray.core.config_base import RayConfig
from wsss_ray.core.progress import log
from wsss_ray.core.resources import PoolPlan, UseGpu, plan_actor_pool

API_SERVER_ADDRESS_VAR = "RAY_API_SERVER_ADDRESS"
# ``ray.autoscaling`` of the run, for every process that sizes worker groups (the driver, Tune's trial actors).
AUTOSCALING_VAR = "WSSS_AUTOSCALING"
_PINNED_ADDRESS: str | None = None  # the value pin_state_api set (replaced when it starts another cluster)
# Passed to every Ray worker so that storage (pyarrow S3) finds the same endpoint and credentials as the
# driver on a local cluster. On a real cluster the pods get them from a Kubernetes Secret instead.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def cluster_address(config: RayConfig) -> str | None:
    """The cluster ``init_ray`` joins (the config's address, else RAY_ADDRESS); None: it starts a local one."""
    return config.address or os.environ.get("RAY_ADDRESS")


# Said once per run, before the line it explains: Ray Data's model actor pools are created with the model as a
# constructor argument and restart on failure, which Ray's C++ core reports at error level in every run.
CXX_NOTE = ("a line \"core_worker.cc ... has constructor arguments in the object store and max_restarts > 0\" "
            "may follow: it is Ray's C++ core noting that the model actor pools restart with their model; expected")
# Ray's driver-side loggers: at the default verbosity only their errors reach the console.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.util")


def init_ray(config: RayConfig, verbose: bool = False) -> None:
    """Join the cluster named by the config or RAY_ADDRESS, or start a local one.

    By default the workers' output (Ray Train's checkpoint lines, Ray Data's execution plans) stays in Ray's
    session log files (``log_to_driver=False``; see :func:`ray_logs_dir`) and Ray's own driver-side loggers show
    errors only: the console carries the stages' own lines. ``verbose`` brings both back.
    """
    if ray.is_initialized():
        pin_cluster_actors()
        return
    address = cluster_address(config)
    if config.autoscaling is not None:  # else the variable the job's runtime env set, if any
        os.environ[AUTOSCALING_VAR] = "1" if config.autoscaling else "0"
    # A job's driver (ray job submit) already runs in the job's runtime env, which reaches every worker; Ray refuses
    # a driver runtime env that sets one of its variables again, so those are left out.
    job_vars = _job_env_vars()
    env = {k: os.environ[k] for k in (*_FORWARDED_ENV, AUTOSCALING_VAR) if k in os.environ and k not in job_vars}
    # Workers of a local cluster inherit the driver's environment; the runtime env covers a remote one.
    runtime_env = {"env_vars": env} if env and address else None
    # logging_level: ray.init sets the "ray" logger's level itself (its token-auth warning, "Started a local Ray
    # instance") before anything can be changed afterwards.
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose, logging_level=level)
    else:
        port = pin_state_api() if config.include_dashboard else None
        context = ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=config.include_dashboard,
                           dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=verbose,
                           logging_level=level)
        if context.dashboard_url:
            log("ray", f"dashboard: http://{context.dashboard_url}")
    quiet_ray_logging(verbose)  # Ray's libraries' loggers (ray.data, ray.train, ray.tune)
    if not verbose:
        log("ray", f"Ray's own logs: {ray_logs_dir()} (--verbose shows them here)")
        # Ray's C++ core prints its error-level lines to the driver's stderr whatever the Python settings (only
        # RAY_BACKEND_LOG_LEVEL, which every Ray process inherits, would hide them, from the log files too).
        log("ray", CXX_NOTE)
    # Ray Data's per-operator progress bars are noisy in logs; our stages print their own progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    pin_cluster_actors()


# Ray's cluster-wide detached actors that are pinned for good (hard node label or affinity) to the node of
# whichever process first asks for them, "to fate-share with the driver" (Ray 2.60): (module, creating function,
# the actor's name and namespace). Asked first by a Ray Train worker or a Tune trial on a worker node, they live
# there; once that node is lost every later use fails (ActorUnschedulableError), e.g. Ray Data's actor pools
# (ActorLocationTracker) and Ray Train's elastic resizing (AutoscalingCoordinator), both measured in the fault
# tests. ``pin_cluster_actors`` creates them from the driver first.
CLUSTER_ACTORS = (
    ("ray.data._internal.execution.node_trackers.actor_location", "get_or_create_actor_location_tracker",
     "ActorLocationTracker", "ActorLocationTracker"),
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator", "get_or_create_autoscaling_coordinator",
     "AutoscalingCoordinator", "AutoscalingCoordinator"),
    ("ray.data._internal.stats", "get_or_create_stats_actor", "datasets_stats_actor", "_dataset_stats_actor"),
    ("ray.data._internal.stats_summary_actor", "_get_or_create_stats_summary_actor",
     "dataset_stats_summary_actor", "_dataset_stats_summary_actor"),
)  # Ray Data's usage-collection actor is pinned alike, but every call to it is fire-and-forget with errors ignored


def pin_cluster_actors() -> None:
    """Create Ray's cluster-wide driver-pinned actors (``CLUSTER_ACTORS``) from the driver, on its node.

    Ray means them to share the driver's fate, and pins each to the node of the process that first asks for it.
    In our runs that is often a training worker (its ingest stream, its elastic resize requests) on a worker
    node, whose loss then breaks every later actor pool or elastic group in the cluster. Created here, from the
    driver, before any stage runs, they live on the driver's node. A Ray without one of them: nothing to pin.
    """
    for module, function, _, _ in CLUSTER_ACTORS:
        try:
            create = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            continue
        create()


def _job_env_vars() -> set[str]:
    """The variables the runtime env of the Ray job this driver runs in sets (none outside a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for a submitted driver
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else set()
    except (ValueError, AttributeError):  # not the JSON Ray writes: forward as usual
        return set()


def quiet_ray_logging(verbose: bool) -> None:
    """Ray's driver-side loggers at INFO (``verbose``) or ERROR."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def ray_logs_dir() -> str:
    """This node's Ray session log folder (``<temp dir>/session_<time>/logs``): the workers' stdout/stderr.

    Ray has no public accessor for it (2.60); the driver's node object knows it. On a multi-node cluster each
    node keeps its own workers' logs in the same place, and the dashboard's Logs tab shows them all.
    """
    try:
        from ray._private.worker import global_worker

        return str(global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - only a pointer for people; never fail a run over it
        # Ray's own rule for its default temp folder (RAY_TMPDIR, else TMPDIR on Linux, else /tmp).
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, "ray", "session_latest", "logs")


def pin_state_api() -> int:
    """Choose the next local cluster's dashboard port and point Ray's state API clients at it; returns the port.

    Ray processes find the state API from RAY_API_SERVER_ADDRESS / RAY_ADDRESS, or else by scanning the machine
    for GCS processes. With two Ray clusters on one machine (a test suite beside a benchmark, two users of a
    workstation) the scan is ambiguous, and Ray Train's placement-group cleaner thread dies on the error: an
    early-stopped trial then never gives its CPUs back and the sweep stalls (measured). Workers inherit the
    driver's environment through the raylet, so this must run before ``ray.init`` starts the cluster. An address
    the user exported is kept.
    """
    global _PINNED_ADDRESS
    current = os.environ.get(API_SERVER_ADDRESS_VAR)
    if current is not None and current != _PINNED_ADDRESS:
        return int(current.rsplit(":", 1)[1].rstrip("/"))
    with socket.socket() as probe:  # a free port; the dashboard binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _PINNED_ADDRESS = os.environ[API_SERVER_ADDRESS_VAR] = f"http://127.0.0.1:{port}"
    return port


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_autoscales() -> bool:
    """Whether the run's ``ray.autoscaling`` says an autoscaler adds nodes (set by :func:`init_ray`)."""
    return os.environ.get(AUTOSCALING_VAR, "0") == "1"


def plan_model_pool(field: str, max_actors: int, use_gpu: UseGpu, setting: str | None = None) -> PoolPlan:
    """:func:`~wsss_ray.core.resources.plan_actor_pool` for this cluster (ConfigError when it cannot fit)."""
    return plan_actor_pool(field, max_actors, use_gpu, ray.cluster_resources().get("GPU", 0), cluster_cpus(),
                           cluster_autoscales(), setting)


def model_actor_pool(plan: PoolPlan) -> ActorPoolStrategy:
    """The Ray Data actor pool of a model stage, sized by ``plan`` (:func:`plan_model_pool`)."""
    return ActorPoolStrategy(min_size=1, max_size=plan.max_actors)
