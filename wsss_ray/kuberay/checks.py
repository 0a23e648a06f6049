"""Project rules the CRDs cannot express: container resources and privilege, credentials only by reference,
RayJob entrypoints, runtime_env files, Secrets/ConfigMaps and ``ray up`` cluster-launcher files."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema

from wsss_ray.kuberay.schema import format_path, join_path, ray_launcher_schema

# A name containing any of these is treated as a credential: its value must come from a Secret.
SECRET_NAME_MARKERS = ("SECRET", "KEY", "TOKEN", "PASSWORD")
# Keys of a pod spec that hold container lists; all of them run code and need limits and a safe context.
_CONTAINER_LISTS = ("containers", "initContainers")
# Looks like an AWS access key id; a cluster-launcher file must never carry one.
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_LAUNCHER_CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def _containers(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container dict anywhere in a document: head, worker groups, the RayJob submitter, init containers."""

    if isinstance(node, dict):
        for key, value in node.items():
            child = join_path(path, str(key))
            if key in _CONTAINER_LISTS and isinstance(value, list):
                for index, container in enumerate(value):
                    if isinstance(container, dict):
                        yield join_path(child, index), container
            else:
                yield from _containers(value, child)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _containers(item, join_path(path, index))


def _check_resources(resources: Any, path: str) -> Iterator[tuple[str, str]]:
    """Requests *and* limits: without limits one runaway CRF task can starve a node; without requests the
    scheduler packs pods it cannot run."""

    if not isinstance(resources, dict):
        yield join_path(path, "resources"), "missing resources (requests and limits are required)"
        return
    for part in ("requests", "limits"):
        if not resources.get(part):
            yield join_path(join_path(path, "resources"), part), f"missing resources.{part}"


def container_problems(document: Any) -> Iterator[tuple[str, str]]:
    """Project rules for every container: resources, no privilege, credentials only by reference."""

    for path, container in _containers(document):
        yield from _check_resources(container.get("resources"), path)
        security = container.get("securityContext")
        if isinstance(security, dict) and security.get("privileged") is True:
            yield join_path(join_path(path, "securityContext"), "privileged"), "privileged containers are not allowed"
        for index, env in enumerate(container.get("env") or []):
            if not isinstance(env, dict):
                continue
            name = str(env.get("name", ""))
            if _is_secret_name(name) and "value" in env:
                yield (
                    join_path(join_path(join_path(path, "env"), index), "value"),
                    f"{name} looks like a credential: take it from a Secret (valueFrom.secretKeyRef), not inline",
                )


def autoscaler_problems(cluster_spec: Mapping[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """The operator injects the autoscaler sidecar; its resources come from ``autoscalerOptions.resources``."""

    if cluster_spec.get("enableInTreeAutoscaling") is True:
        options = cluster_spec.get("autoscalerOptions")
        resources = options.get("resources") if isinstance(options, dict) else None
        yield from _check_resources(resources, join_path(path, "autoscalerOptions"))
        security = options.get("securityContext") if isinstance(options, dict) else None
        if isinstance(security, dict) and security.get("privileged") is True:
            yield (
                join_path(path, "autoscalerOptions.securityContext.privileged"),
                "privileged containers are not allowed",
            )


def runtime_env_problems(runtime_env: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """A Ray runtime_env mapping: env_vars are always inline, so none may look like a credential."""

    if not isinstance(runtime_env, dict):
        yield path, "runtime environment must be a mapping"
        return
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        yield join_path(path, "env_vars"), "env_vars must be a mapping of name to string"
        return
    for name, value in env_vars.items():
        if _is_secret_name(str(name)):
            yield (
                join_path(join_path(path, "env_vars"), str(name)),
                (
                    f"{name} looks like a credential: runtime_env env_vars are stored in plain text; "
                    "use the pods' Secret-backed environment instead"
                ),
            )
        if not isinstance(value, str):
            yield join_path(join_path(path, "env_vars"), str(name)), "runtime_env env_vars values must be strings"


def entrypoint_problems(
    entrypoint: str, repo_root: Path, allow_missing: Iterable[str] = ()
) -> Iterator[tuple[str, str]]:
    """The script a RayJob runs must be under ``jobs/`` and exist; so must its ``--config``/``--space`` files.

    Paths are relative to the repo root, which is the job's working_dir on the cluster.
    """

    allowed = {str(Path(p)) for p in allow_missing}
    try:
        tokens = shlex.split(entrypoint)
    except ValueError as exc:
        yield "spec.entrypoint", f"cannot parse entrypoint: {exc}"
        return
    scripts = [token for token in tokens if token.endswith(".py")]
    if not scripts:
        yield "spec.entrypoint", "entrypoint names no Python script under jobs/"
    referenced: list[tuple[str, str]] = []
    for script in scripts[:1]:
        if Path(script).parts[:1] != ("jobs",):
            yield "spec.entrypoint", f"entrypoint script {script} is not under jobs/"
        referenced.append(("script", script))
    for position, token in enumerate(tokens):
        for flag in ("--config", "--space"):
            if token == flag and position + 1 < len(tokens):
                referenced.append((flag, tokens[position + 1]))
            elif token.startswith(flag + "="):
                referenced.append((flag, token.split("=", 1)[1]))
    for what, relative in referenced:
        if str(Path(relative)) in allowed:
            continue
        if not (repo_root / relative).is_file():
            yield "spec.entrypoint", f"{what} {relative} does not exist in the repository"


def basic_shape_problems(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key in ("apiVersion", "kind"):
        if not isinstance(document.get(key), str) or not document.get(key):
            yield key, "missing"
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        yield "metadata.name", "missing"


def _walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, Any, str]]:
    """(path, key, value) for every scalar leaf, to look for inline credentials in launcher files."""

    if isinstance(node, dict):
        for key, value in node.items():
            child = join_path(path, str(key))
            if isinstance(value, (dict, list)):
                yield from _walk_strings(value, child)
            else:
                yield child, key, value
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, (dict, list)):
                yield from _walk_strings(item, join_path(path, index))
            else:
                yield join_path(path, index), index, item


def launcher_problems(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """A ``ray up`` file: Ray's own schema, the keys this project relies on, and no inline credentials."""

    schema = ray_launcher_schema()
    if schema is not None:
        for error in jsonschema.Draft7Validator(schema).iter_errors(document):
            yield format_path(error.absolute_path), error.message
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands"):
        if key not in document:
            yield key, "missing"
    provider = document.get("provider") or {}
    for key in ("type", "region"):
        if isinstance(provider, dict) and not provider.get(key):
            yield join_path("provider", key), "missing"
    auth = document.get("auth") or {}
    if isinstance(auth, dict) and not auth.get("ssh_user"):
        yield "auth.ssh_user", "missing"
    node_types = document.get("available_node_types") or {}
    if isinstance(node_types, dict):
        if document.get("head_node_type") not in node_types:
            yield "head_node_type", "must name one of available_node_types"
        for name, node_type in node_types.items():
            base = join_path("available_node_types", str(name))
            if not isinstance(node_type, dict):
                continue
            for key in ("resources", "min_workers", "max_workers"):
                if key not in node_type:
                    yield join_path(base, key), "missing"
            if not (node_type.get("node_config") or {}).get("InstanceType"):
                yield join_path(base, "node_config.InstanceType"), "missing"
    commands = [str(c) for c in document.get("setup_commands") or []]
    torch_at = next((i for i, c in enumerate(commands) if re.search(r"\btorch==", c)), None)
    project_at = next((i for i, c in enumerate(commands) if "install" in c and re.search(r"-e\s", c)), None)
    if project_at is None:
        yield "setup_commands", "no command installs the project (pip install -e)"
    elif torch_at is None or torch_at > project_at:
        # An unpinned torch pulled in by the project's requirements is a multi-GB download of the wrong build.
        yield "setup_commands", "torch must be installed pinned (torch==...) before the project"
    for path, key, value in _walk_strings(document):
        if isinstance(key, str) and key.lower() in _LAUNCHER_CREDENTIAL_KEYS:
            yield path, "credentials must not be inline: use an IAM instance profile"
        elif isinstance(value, str) and _AWS_KEY_ID.search(value):
            yield path, "looks like an AWS access key id: use an IAM instance profile"
