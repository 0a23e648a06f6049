"""Where S3 is and who we are there, from the standard AWS environment variables.

:mod:`wsss_ray.core.storage` builds its (cached, retrying) filesystem from these settings; the pre-flight step
(:mod:`wsss_ray.preflight`) builds a short-lived one with short timeouts, so a wrong endpoint is reported in
seconds instead of after the storage layer's full retry budget.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["ENDPOINT_VARS", "env_endpoint", "probe_filesystem", "s3_kwargs"]

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def env_endpoint() -> tuple[str | None, str]:
    """(endpoint_override, scheme) from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
    url = os.environ.get(ENDPOINT_VARS[0]) or os.environ.get(ENDPOINT_VARS[1])
    if not url:
        return None, "https"
    if "://" not in url:
        return url.rstrip("/"), "https"
    parsed = urlparse(url)
    return (parsed.netloc + parsed.path).rstrip("/"), parsed.scheme or "https"


def s3_kwargs() -> dict[str, Any]:
    """``pyarrow.fs.S3FileSystem`` keyword arguments for the current environment (secrets included: never log)."""
    endpoint, scheme = env_endpoint()
    access_key = os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    token = os.environ.get("AWS_SESSION_TOKEN") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {"region": region, "scheme": scheme}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    # Explicit keys travel with the pickled filesystem (Ray Train ships it to workers); without them pyarrow
    # falls back to the AWS SDK's default chain (config files, instance profile).
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token)
    return kwargs


def probe_filesystem(connect_timeout_s: float = 2.0, request_timeout_s: float = 10.0,
                     attempts: int = 2) -> pafs.S3FileSystem:
    """A fresh S3 filesystem that gives up quickly: ``attempts`` tries, each connect bounded by
    ``connect_timeout_s`` (pyarrow applies ``request_timeout_s`` to reads on Windows and macOS only)."""
    return pafs.S3FileSystem(connect_timeout=connect_timeout_s, request_timeout=request_timeout_s,
                             retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts), **s3_kwargs())
