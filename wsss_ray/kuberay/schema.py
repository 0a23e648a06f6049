"""KubeRay CRD schemas: loading, normalising Kubernetes-only keywords, and the unknown-field walk.

Also the shared plumbing of the manifest checks: the YAML loader, where the repo and CRDs live, JSON-path
formatting, and Ray's cluster-launcher schema.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The C loader is ~10x faster on the 1-2 MB CRD files; fall back to the pure-Python one where libyaml is absent.
YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO_ROOT = Path(__file__).resolve().parents[2]
# KubeRay's CRDs ship inside the package (crds/README.md says which commit), so every clone and install has them.
DEFAULT_CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAY_API_VERSION = "ray.io/v1"
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
        crd = yaml.load(handle, Loader=YAML_LOADER)
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


def ray_launcher_schema() -> dict[str, Any] | None:
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


def join_path(path: str, key: str | int) -> str:
    """The JSON path of ``key`` under ``path``: ``a.b`` for a mapping key, ``a[0]`` for a list index."""

    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def format_path(parts: Iterable[str | int]) -> str:
    """A JSON path from its parts, e.g. a jsonschema error's ``absolute_path``."""

    path = ""
    for part in parts:
        path = join_path(path, part)
    return path


# ---------------------------------------------------------------------------------------------------- CRD checks


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
            child = join_path(path, str(key))
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
            yield from unknown_fields(item, schema["items"], join_path(path, index))


def ray_kind_problems(document: dict[str, Any], crd_dir: Path) -> Iterator[tuple[str, str]]:
    """A RayCluster/RayJob against its CRD: the API version, the Draft 7 pass, then the unknown-field walk."""

    api_version = document.get("apiVersion")
    if api_version != RAY_API_VERSION:
        # Ray 2.60 targets v1; v1alpha1 is frozen and lacks fields the manifests use.
        yield "apiVersion", f"must be {RAY_API_VERSION}, got {api_version!r}"
        return
    version = api_version.split("/", 1)[1]
    validator = _validator(document["kind"], version, str(crd_dir.resolve()))
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        yield format_path(error.absolute_path), error.message
    yield from unknown_fields(document, crd_schema(document["kind"], version, crd_dir))
