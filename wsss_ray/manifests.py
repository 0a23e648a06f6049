"""Offline checks for the cluster manifests in ``cluster/``, before ``kubectl apply`` or ``ray up`` sees them.

    python -m wsss_ray.manifests cluster/*.yaml
    python -m wsss_ray.manifests --crd-dir path/to/kuberay-crds --allow-missing tuning/new_space.yaml FILE...

RayCluster and RayJob documents are checked against the KubeRay CRDs' own OpenAPI schemas, in two passes:

1. ``jsonschema.Draft7Validator`` over ``spec.versions[<version>].schema.openAPIV3Schema``: types, required
   fields, enums, patterns.
2. A structural walk that reports every key the schema does not declare. JSON Schema alone lets unknown keys
   through, and the API server silently *prunes* them, so a typo such as ``resourcez`` would otherwise apply
   cleanly and be ignored. The walk honours ``x-kubernetes-preserve-unknown-fields``, ``additionalProperties``
   (maps such as labels, rayStartParams, resources), ``items`` and ``x-kubernetes-int-or-string``.

Then project rules that the CRD cannot express: every container has resource requests and limits, none is
privileged, secret-looking environment variables come from ``valueFrom`` (never an inline ``value``), and a
RayJob's entrypoint names a script under ``jobs/`` and ``--config``/``--space`` files that exist in the repo.
Other kinds (Secret, ConfigMap) get a basic shape check; a Ray cluster-launcher file (``ray up``) is checked
against Ray's own ``ray-schema.json`` when Ray is installed, plus the keys this project relies on; a runtime_env
file (``jobs/runtime_env.yaml``) must not carry credential-like env_vars.

Every problem is a :class:`ManifestError` whose text names the file, the document index and the JSON path:
``cluster/raycluster.yaml[0]: spec.headGroupSpec.template.spec.containers[0].resourcez: unknown field``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The C loader is ~10x faster on the 1-2 MB CRD files; fall back to the pure-Python one where libyaml is absent.
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and the dev machines keep the shared material (CRDs, notes) beside the clone.
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAY_API_VERSION = "ray.io/v1"
# A name containing any of these is treated as a credential: its value must come from a Secret.
SECRET_NAME_MARKERS = ("SECRET", "KEY", "TOKEN", "PASSWORD")
# Keys of a pod spec that hold container lists; all of them run code and need limits and a safe context.
_CONTAINER_LISTS = ("containers", "initContainers")
# Fields of ObjectMeta that may appear in a top-level ``metadata``: the CRD schema declares it only as
# ``type: object`` because the API server validates it itself.
_OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "labels",
        "annotations",
        "finalizers",
        "ownerReferences",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    }
)
# Looks like an AWS access key id; a cluster-launcher file must never carry one.
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_LAUNCHER_CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


@dataclass(frozen=True)
class ManifestError:
    """One problem in one document: ``str()`` gives ``FILE[INDEX]: PATH: MESSAGE``."""

    source: str
    index: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}[{self.index}]"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


# ---------------------------------------------------------------------------------------------------- schemas


def _normalise_schema(node: Any) -> None:
    """Rewrite Kubernetes-only keywords into plain JSON Schema, in place, so Draft 7 judges like the API server.

    ``nullable: true`` allows null; ``x-kubernetes-int-or-string`` without an ``anyOf`` accepts int or string
    (controller-gen usually emits the ``anyOf`` itself, but hand-written CRDs may not).
    """

    if isinstance(node, list):
        for item in node:
            _normalise_schema(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            for sub in value.values():
                _normalise_schema(sub)
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            _normalise_schema(value)


@functools.cache
def _load_crd_versions(crd_file: str) -> dict[str, dict[str, Any]]:
    """``{version name: openAPIV3Schema}`` of one CRD file; cached because each file is 1-2 MB of YAML."""

    with open(crd_file, encoding="utf-8") as handle:
        crd = yaml.load(handle, Loader=_Loader)
    versions: dict[str, dict[str, Any]] = {}
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        _normalise_schema(schema)
        versions[version["name"]] = schema
    return versions


def crd_schema(kind: str, version: str, crd_dir: Path | None = None) -> dict[str, Any]:
    """The OpenAPI schema KubeRay declares for ``kind`` at ``version`` (e.g. ``RayJob``, ``v1``)."""

    directory = Path(crd_dir) if crd_dir is not None else DEFAULT_CRD_DIR
    crd_file = directory / CRD_FILES[kind]
    if not crd_file.is_file():
        raise FileNotFoundError(f"KubeRay CRD for {kind} not found at {crd_file} (pass --crd-dir)")
    versions = _load_crd_versions(str(crd_file.resolve()))
    if version not in versions:
        raise KeyError(f"{crd_file.name} has no version {version!r} (has {sorted(versions)})")
    return versions[version]


@functools.cache
def _validator(kind: str, version: str, crd_dir: str) -> jsonschema.Draft7Validator:
    # Built once per schema: the validator caches its compiled keyword handlers.
    return jsonschema.Draft7Validator(crd_schema(kind, version, Path(crd_dir)))


def _ray_launcher_schema() -> dict[str, Any] | None:
    """Ray's cluster-launcher schema, found without importing ray (importing it costs seconds)."""

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "autoscaler" / "ray-schema.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


# ---------------------------------------------------------------------------------------------------- paths


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _format_path(parts: Iterable[str | int]) -> str:
    path = ""
    for part in parts:
        path = _join(path, part)
    return path


# ---------------------------------------------------------------------------------------------------- checks


def unknown_fields(document: Any, schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, str]]:
    """Yield ``(json path, message)`` for every key of ``document`` that ``schema`` does not declare.

    Values of the wrong type are left to the Draft 7 pass; this walk only follows what it can match.
    """

    if schema.get("x-kubernetes-preserve-unknown-fields") is True or schema.get("x-kubernetes-int-or-string"):
        return
    if isinstance(document, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, value in document.items():
            child = _join(path, str(key))
            if isinstance(properties, Mapping) and key in properties:
                yield from unknown_fields(value, properties[key], child)
            elif isinstance(additional, Mapping):
                yield from unknown_fields(value, additional, child)
            elif additional is True:
                continue
            elif path == "metadata" and properties is None:
                # Top-level ObjectMeta: declared as a bare object in every CRD, validated by the API server.
                if key not in _OBJECT_META_FIELDS:
                    yield child, "unknown field"
            else:
                yield child, "unknown field"
    elif isinstance(document, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(document):
            yield from unknown_fields(item, schema["items"], _join(path, index))


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def _containers(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container dict anywhere in a document: head, worker groups, the RayJob submitter, init containers."""

    if isinstance(node, dict):
        for key, value in node.items():
            child = _join(path, str(key))
            if key in _CONTAINER_LISTS and isinstance(value, list):
                for index, container in enumerate(value):
                    if isinstance(container, dict):
                        yield _join(child, index), container
            else:
                yield from _containers(value, child)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _containers(item, _join(path, index))


def _check_resources(resources: Any, path: str) -> Iterator[tuple[str, str]]:
    """Requests *and* limits: without limits one runaway CRF task can starve a node; without requests the
    scheduler packs pods it cannot run."""

    if not isinstance(resources, dict):
        yield _join(path, "resources"), "missing resources (requests and limits are required)"
        return
    for part in ("requests", "limits"):
        if not resources.get(part):
            yield _join(_join(path, "resources"), part), f"missing resources.{part}"


def container_problems(document: Any) -> Iterator[tuple[str, str]]:
    """Project rules for every container: resources, no privilege, credentials only by reference."""

    for path, container in _containers(document):
        yield from _check_resources(container.get("resources"), path)
        security = container.get("securityContext")
        if isinstance(security, dict) and security.get("privileged") is True:
            yield _join(_join(path, "securityContext"), "privileged"), "privileged containers are not allowed"
        for index, env in enumerate(container.get("env") or []):
            if not isinstance(env, dict):
                continue
            name = str(env.get("name", ""))
            if _is_secret_name(name) and "value" in env:
                yield (
                    _join(_join(_join(path, "env"), index), "value"),
                    f"{name} looks like a credential: take it from a Secret (valueFrom.secretKeyRef), not inline",
                )


def _autoscaler_problems(cluster_spec: Mapping[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """The operator injects the autoscaler sidecar; its resources come from ``autoscalerOptions.resources``."""

    if cluster_spec.get("enableInTreeAutoscaling") is True:
        options = cluster_spec.get("autoscalerOptions")
        resources = options.get("resources") if isinstance(options, dict) else None
        yield from _check_resources(resources, _join(path, "autoscalerOptions"))
        security = options.get("securityContext") if isinstance(options, dict) else None
        if isinstance(security, dict) and security.get("privileged") is True:
            yield (
                _join(path, "autoscalerOptions.securityContext.privileged"),
                "privileged containers are not allowed",
            )


def runtime_env_problems(runtime_env: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """A Ray runtime_env mapping: env_vars are always inline, so none may look like a credential."""

    if not isinstance(runtime_env, dict):
        yield path, "runtime environment must be a mapping"
        return
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        yield _join(path, "env_vars"), "env_vars must be a mapping of name to string"
        return
    for name, value in env_vars.items():
        if _is_secret_name(str(name)):
            yield (
                _join(_join(path, "env_vars"), str(name)),
                (
                    f"{name} looks like a credential: runtime_env env_vars are stored in plain text; "
                    "use the pods' Secret-backed environment instead"
                ),
            )
        if not isinstance(value, str):
            yield _join(_join(path, "env_vars"), str(name)), "runtime_env env_vars values must be strings"


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


def _ray_kind_problems(document: dict[str, Any], crd_dir: Path) -> Iterator[tuple[str, str]]:
    api_version = document.get("apiVersion")
    if api_version != RAY_API_VERSION:
        # Ray 2.60 targets v1; v1alpha1 is frozen and lacks fields the manifests use.
        yield "apiVersion", f"must be {RAY_API_VERSION}, got {api_version!r}"
        return
    version = api_version.split("/", 1)[1]
    validator = _validator(document["kind"], version, str(crd_dir.resolve()))
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        yield _format_path(error.absolute_path), error.message
    yield from unknown_fields(document, crd_schema(document["kind"], version, crd_dir))


def _basic_shape_problems(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
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
            child = _join(path, str(key))
            if isinstance(value, (dict, list)):
                yield from _walk_strings(value, child)
            else:
                yield child, key, value
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, (dict, list)):
                yield from _walk_strings(item, _join(path, index))
            else:
                yield _join(path, index), index, item


def launcher_problems(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """A ``ray up`` file: Ray's own schema, the keys this project relies on, and no inline credentials."""

    schema = _ray_launcher_schema()
    if schema is not None:
        for error in jsonschema.Draft7Validator(schema).iter_errors(document):
            yield _format_path(error.absolute_path), error.message
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands"):
        if key not in document:
            yield key, "missing"
    provider = document.get("provider") or {}
    for key in ("type", "region"):
        if isinstance(provider, dict) and not provider.get(key):
            yield _join("provider", key), "missing"
    auth = document.get("auth") or {}
    if isinstance(auth, dict) and not auth.get("ssh_user"):
        yield "auth.ssh_user", "missing"
    node_types = document.get("available_node_types") or {}
    if isinstance(node_types, dict):
        if document.get("head_node_type") not in node_types:
            yield "head_node_type", "must name one of available_node_types"
        for name, node_type in node_types.items():
            base = _join("available_node_types", str(name))
            if not isinstance(node_type, dict):
                continue
            for key in ("resources", "min_workers", "max_workers"):
                if key not in node_type:
                    yield _join(base, key), "missing"
            if not (node_type.get("node_config") or {}).get("InstanceType"):
                yield _join(base, "node_config.InstanceType"), "missing"
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


def validate_document(
    document: Any,
    *,
    source: str = "<document>",
    index: int = 0,
    crd_dir: Path | None = None,
    repo_root: Path | None = None,
    allow_missing: Iterable[str] = (),
) -> list[ManifestError]:
    """All problems of one parsed YAML document; an empty list means it is fine.

    ``allow_missing`` names repo-relative files an entrypoint may reference before they are written.
    """

    crd_dir = Path(crd_dir) if crd_dir is not None else DEFAULT_CRD_DIR
    repo_root = Path(repo_root) if repo_root is not None else REPO_ROOT
    if not isinstance(document, dict):
        return [ManifestError(source, index, "", "document is not a mapping")]

    problems: list[tuple[str, str]] = []
    kind = document.get("kind")
    if kind is None and "cluster_name" in document:
        problems.extend(launcher_problems(document))
    elif kind is None and ("working_dir" in document or "env_vars" in document):
        # A runtime_env file for `ray job submit --runtime-env` (jobs/runtime_env.yaml).
        problems.extend(runtime_env_problems(document))
    elif kind in CRD_FILES:
        problems.extend(_ray_kind_problems(document, crd_dir))
        problems.extend(container_problems(document))
        spec = document.get("spec") if isinstance(document.get("spec"), dict) else {}
        problems.extend(_autoscaler_problems(spec, "spec"))
        if isinstance(spec.get("rayClusterSpec"), dict):
            problems.extend(_autoscaler_problems(spec["rayClusterSpec"], "spec.rayClusterSpec"))
        if kind == "RayJob":
            entrypoint = spec.get("entrypoint")
            if isinstance(entrypoint, str):
                problems.extend(entrypoint_problems(entrypoint, repo_root, allow_missing))
            else:
                problems.append(("spec.entrypoint", "missing"))
            runtime_env_yaml = spec.get("runtimeEnvYAML")
            if isinstance(runtime_env_yaml, str):
                try:
                    runtime_env = yaml.load(runtime_env_yaml, Loader=_Loader)
                except yaml.YAMLError as exc:
                    problems.append(("spec.runtimeEnvYAML", f"not valid YAML: {exc}"))
                else:
                    problems.extend(runtime_env_problems(runtime_env, "spec.runtimeEnvYAML"))
    else:
        problems.extend(_basic_shape_problems(document))
        problems.extend(container_problems(document))
    return [ManifestError(source, index, path, message) for path, message in problems]


def validate_file(
    path: str | Path,
    *,
    crd_dir: Path | None = None,
    repo_root: Path | None = None,
    allow_missing: Iterable[str] = (),
) -> list[ManifestError]:
    """All problems of every document in one YAML file (``---``-separated; empty documents are skipped)."""

    source = str(path)
    allow_missing = tuple(allow_missing)
    try:
        with open(path, encoding="utf-8") as handle:
            documents = list(yaml.load_all(handle, Loader=_Loader))
    except (OSError, yaml.YAMLError) as exc:
        return [ManifestError(source, 0, "", f"cannot read: {exc}")]
    errors: list[ManifestError] = []
    for index, document in enumerate(documents):
        if document is None:
            continue
        errors.extend(
            validate_document(
                document,
                source=source,
                index=index,
                crd_dir=crd_dir,
                repo_root=repo_root,
                allow_missing=allow_missing,
            )
        )
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsss_ray.manifests",
        description="Validate KubeRay manifests (against the CRDs), Secrets/ConfigMaps and ray-up launcher files.",
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--crd-dir", type=Path, default=None, help=f"KubeRay CRD folder (default {DEFAULT_CRD_DIR})")
    parser.add_argument("--repo-root", type=Path, default=None, help="where entrypoint paths resolve")
    parser.add_argument(
        "--allow-missing",
        action="append",
        default=[],
        metavar="PATH",
        help="a repo-relative file an entrypoint may name before it exists (repeatable)",
    )
    args = parser.parse_args(argv)
    errors: list[ManifestError] = []
    for path in args.files:
        try:
            errors.extend(
                validate_file(path, crd_dir=args.crd_dir, repo_root=args.repo_root, allow_missing=args.allow_missing)
            )
        except (FileNotFoundError, KeyError) as exc:
            errors.append(ManifestError(str(path), 0, "", str(exc)))
    for error in errors:
        print(error, file=sys.stderr)
    print(f"{len(args.files)} file(s), {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
