"""Pre-flight check of where results go: a local folder this user may write, or an S3 prefix that the endpoint
and the credentials let us list and write (a small test object is written and deleted)."""

from __future__ import annotations

import getpass
import os

from wsss_ray.core import storage
from wsss_ray.pipeline_config import PipelineConfig
from wsss_ray.preflight import probe
from wsss_ray.preflight.problem import PreflightOptions, Problem


def check_output(config: PipelineConfig, options: PreflightOptions) -> list[Problem]:
    """``output``: writable (locally) or reachable and writable with these credentials (S3)."""
    return output_problems("output", config.output, options)


def output_problems(field: str, uri: str, options: PreflightOptions) -> list[Problem]:
    """The problems of writing below ``uri``; ``field`` names it in them (``output``, ``--out``)."""
    if options.skip_remote(uri, field):
        return []
    if storage.is_s3(uri):
        try:
            probe.probe_write(uri)
        except probe.Unreachable as error:
            return [Problem(field, uri, error.what, error.fix)]
        return []
    path = storage.local_path_or_none(uri)
    assert path is not None
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
        return [Problem(field, uri, what, "choose another output folder")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem(field, uri, f"not writable: {existing} does not let {getpass.getuser()} write",
                        "choose a folder you may write to, or change its permissions")]
    return []
