"""The per-item skeleton of the long stages: a bad item is reported and skipped, never fatal.

Every per-image stage (ingest, pseudo_labels, evaluate, predict) runs the same way: a Ray Data map does one
item's work inside :func:`guarded`, which turns any failure into a reason naming the file; the driver walks the
finished rows with :class:`ItemLoop`, which shows a progress line with throughput and keeps the failure rows.

A storage outage (:class:`~wsss_ray.core.storage.StorageError`: the store unreachable past its retry budget) is
no fault of the item, so :func:`guarded` lets it through: the stage fails with the error naming the URI, and a
rerun resumes, instead of the image being recorded as bad for good.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import pyarrow as pa

from wsss_ray.core import storage
from wsss_ray.core.progress import Progress
from wsss_ray.core.records import FailureRow
from wsss_ray.core.storage import StorageError

T = TypeVar("T")


class BadItemError(Exception):
    """An unusable dataset item: which file is at fault and why."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason

    def __reduce__(self) -> tuple[type[BadItemError], tuple[str, str]]:
        # Default exception pickling replays args (the joined message) into __init__; Ray ships errors pickled.
        return (BadItemError, (self.file, self.reason))


def describe_failure(error: Exception) -> str:
    """A one-line reason: a :class:`BadItemError` as ``file: reason``, anything else with its type and the
    function it came from (enough to find the bug without a traceback in the table)."""
    if isinstance(error, BadItemError):
        return str(error)
    return f"{type(error).__name__}: {error} ({traceback.extract_tb(error.__traceback__)[-1].name})"


def guarded(work: Callable[[], T]) -> tuple[T | None, str | None]:
    """``(work(), None)``, or ``(None, reason)`` when the item is bad (see :func:`describe_failure`).

    :class:`StorageError` propagates: the store is down, not the item bad (see the module docstring).
    """
    try:
        return work(), None
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - a bad item is reported and skipped, never fatal
        return None, describe_failure(error)


class ItemLoop:
    """The driver's walk over a stage's finished rows: progress line, failure rows ``{image_id, reason}``."""

    def __init__(self, stage: str, total: int, unit: str = "images") -> None:
        self.progress = Progress(stage, total, unit)
        self.failures: list[FailureRow] = []

    def rows(self, rows: Iterable[dict[str, Any]], error_key: str = "error") -> Iterator[dict[str, Any]]:
        """Yield every row; a row whose ``error_key`` is set is counted (and kept) as a failure."""
        for row in rows:
            error = row.get(error_key)
            if error:
                self.failures.append({"image_id": row.get("image_id"), "reason": error})
            self.progress.update(failed=int(bool(error)))
            yield row

    @property
    def rate(self) -> float:
        return self.progress.rate


def write_rows_part(prefix_uri: str, table: pa.Table) -> str:
    """Store a batch of finished rows as one more ``part-*.parquet`` under ``prefix_uri``; returns its URI.

    Part names start with the write time, so listing them in name order replays the rows in the order they
    were stored (what :func:`read_rows_parts` relies on), and end with a random suffix, so two writers never
    collide.
    """
    uri = storage.join(prefix_uri, f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
    storage.write_parquet(uri, table)
    return uri


def read_rows_parts(prefix_uri: str, key: str) -> list[dict[str, Any]]:
    """Every stored row, the latest per ``key`` (a rerun that redid an item appended its new row)."""
    rows: list[dict[str, Any]] = []
    for uri in storage.list_files(prefix_uri, suffix=".parquet"):
        rows.extend(storage.read_parquet(uri).to_pylist())
    return list({row[key]: row for row in rows}.values())

