"""What a pre-flight check reports, and what it is told."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsss_ray.core import storage

REPRODUCE_DOC = "docs/reproduce.md"


@dataclass(frozen=True)
class Problem:
    """One thing in the world that is not as the config says: ``field`` (dotted config field, or a CLI option such
    as ``--model``), ``uri`` (the path or URI it points at), ``what`` is wrong and ``fix``: what to do."""

    field: str
    uri: str
    what: str
    fix: str

    def lines(self, source: str = "") -> list[str]:
        """Two lines: ``<file>: <field>: <uri>: <what>`` and ``  fix: <fix>``."""
        head = f"{source}: " if source else ""
        return [f"{head}{self.field}: {self.uri}: {self.what}", f"  fix: {self.fix}"]

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class PreflightOptions:
    # Skip every check that needs the network (S3 URIs): CI, or a config written on a laptop for a cluster.
    offline: bool = False
    skipped: list[str] = field(default_factory=list)

    def skip_remote(self, uri: str, what: str) -> bool:
        """True (and noted) when ``uri`` needs the network and the checks are offline."""
        if self.offline and storage.is_s3(uri):
            self.skipped.append(f"{what} {uri}")
            return True
        return False
