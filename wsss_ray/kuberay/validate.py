"""Validating whole documents and files, the :class:`ManifestError` they report, and the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wsss_ray.kuberay.checks import (
    autoscaler_problems,
    basic_shape_problems,
    container_problems,
    entrypoint_problems,
    launcher_problems,
    runtime_env_problems,
)
from wsss_ray.kuberay.schema import CRD_FILES, DEFAULT_CRD_DIR, REPO_ROOT, YAML_LOADER, ray_kind_problems


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
        problems.extend(ray_kind_problems(document, crd_dir))
        problems.extend(container_problems(document))
        spec = document.get("spec") if isinstance(document.get("spec"), dict) else {}
        problems.extend(autoscaler_problems(spec, "spec"))
        if isinstance(spec.get("rayClusterSpec"), dict):
            problems.extend(autoscaler_problems(spec["rayClusterSpec"], "spec.rayClusterSpec"))
        if kind == "RayJob":
            entrypoint = spec.get("entrypoint")
            if isinstance(entrypoint, str):
                problems.extend(entrypoint_problems(entrypoint, repo_root, allow_missing))
            else:
                problems.append(("spec.entrypoint", "missing"))
            runtime_env_yaml = spec.get("runtimeEnvYAML")
            if isinstance(runtime_env_yaml, str):
                try:
                    runtime_env = yaml.load(runtime_env_yaml, Loader=YAML_LOADER)
                except yaml.YAMLError as exc:
                    problems.append(("spec.runtimeEnvYAML", f"not valid YAML: {exc}"))
                else:
                    problems.extend(runtime_env_problems(runtime_env, "spec.runtimeEnvYAML"))
    else:
        problems.extend(basic_shape_problems(document))
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
            documents = list(yaml.load_all(handle, Loader=YAML_LOADER))
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
        prog="python -m wsss_ray.kuberay",
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
