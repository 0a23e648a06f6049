"""Progress lines for long stages: count, throughput, failures, at most one line every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stage: str, total: int, unit: str = "images", every_s: float = 5.0) -> None:
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done = self.failed = 0
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            self.print()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    def print(self) -> None:
        pct = 100.0 * self.done / max(self.total, 1)
        print(f"[{self.stage}] {self.done}/{self.total} {self.unit} ({pct:.0f}%), {self.rate:.2f} {self.unit}/s, "
              f"{self.failed} failed, {self.elapsed:.0f}s", file=sys.stderr, flush=True)


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)
