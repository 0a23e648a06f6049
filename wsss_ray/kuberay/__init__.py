"""Offline checks for the cluster manifests in ``cluster/``, before ``kubectl apply`` or ``ray up`` sees them.

    python -m wsss_ray.kuberay cluster/*.yaml
    python -m wsss_ray.kuberay --crd-dir path/to/kuberay-crds --allow-missing tuning/new_space.yaml FILE...

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

The checks live in :mod:`.schema` (CRD loading, normalising, the unknown-field walk), :mod:`.checks` (project
rules: containers, runtime_env, entrypoints, launcher files) and :mod:`.validate` (documents, files, the command
line). Every problem is a :class:`ManifestError` whose text names the file, the document index and the JSON path:
``cluster/raycluster.yaml[0]: spec.headGroupSpec.template.spec.containers[0].resourcez: unknown field``.
"""

from __future__ import annotations

from wsss_ray.kuberay.checks import (
    SECRET_NAME_MARKERS,
    container_problems,
    entrypoint_problems,
    launcher_problems,
    runtime_env_problems,
)
from wsss_ray.kuberay.schema import (
    CRD_FILES,
    DEFAULT_CRD_DIR,
    RAY_API_VERSION,
    REPO_ROOT,
    crd_schema,
    unknown_fields,
)
from wsss_ray.kuberay.validate import ManifestError, main, validate_document, validate_file

__all__ = [
    "CRD_FILES",
    "DEFAULT_CRD_DIR",
    "RAY_API_VERSION",
    "REPO_ROOT",
    "SECRET_NAME_MARKERS",
    "ManifestError",
    "container_problems",
    "crd_schema",
    "entrypoint_problems",
    "launcher_problems",
    "main",
    "runtime_env_problems",
    "unknown_fields",
    "validate_document",
    "validate_file",
]
