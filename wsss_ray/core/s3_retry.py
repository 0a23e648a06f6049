"""The S3 retry budget: how many attempts each S3 request gets, and a filesystem that keeps it when pickled.

Storage calls go through :mod:`wsss_ray.core.storage`; this module only builds its S3 filesystem's retry policy.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs as pafs

__all__ = ["DEFAULT_S3_RETRIES", "RETRIES_VAR", "RetryingS3FileSystem", "s3_retries"]

RETRIES_VAR, DEFAULT_S3_RETRIES = "WSSS_S3_RETRIES", 10


def s3_retries() -> int:
    """Attempts per S3 request (``WSSS_S3_RETRIES``, at least 1)."""
    value = os.environ.get(RETRIES_VAR, "")
    try:
        return max(1, int(value)) if value else DEFAULT_S3_RETRIES
    except ValueError:
        raise ValueError(f"{RETRIES_VAR}={value!r}: expected a whole number of attempts") from None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with a retry budget that survives pickling.

    pyarrow's own pickle drops ``retry_strategy``, and Ray Train ships the checkpoint filesystem pickled to its
    controller and workers, which would then retry 3 times only. The AWS SDK's default strategy waits
    50 ms * 2^k before retry k+1 and has no retry quota (the "standard" strategy's token bucket empties in a
    sustained outage and then stops retrying every request at once).
    """

    def __init__(self, attempts: int, **kwargs: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts), **kwargs)
        self._wsss_args = (attempts, kwargs)

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Any]]]:
        return _rebuild_s3, self._wsss_args


def _rebuild_s3(attempts: int, kwargs: dict[str, Any]) -> pafs.S3FileSystem:
    return RetryingS3FileSystem(attempts, **kwargs)
