"""Where a stage writes, and whether it has finished.

Each stage writes below ``<output>/<stage>-<hash>``, the hash covering the stage's config and its inputs'
hashes, so a changed config never reuses stale outputs and an unchanged one finds its finished work. A stage is
complete only once ``_SUCCESS.json`` exists; it is written last, atomically, holding the stage's summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from wsss_ray.core import storage

SUCCESS = "_SUCCESS.json"


@dataclass
class StageDir:
    name: str
    uri: str
    key: str
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def create(cls, output: str, name: str, key: str) -> StageDir:
        return cls(name, storage.join(output, f"{name}-{key}"), key)

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def is_complete(self) -> bool:
        return storage.exists(self.path(SUCCESS))

    def summary(self) -> dict[str, Any]:
        return storage.read_json(self.path(SUCCESS))

    def complete(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary = {"stage": self.name, "key": self.key, "uri": self.uri,
                   "seconds": round(time.monotonic() - self.started, 2), **summary}
        storage.write_json(self.path(SUCCESS), summary)
        return summary
