"""Progress lines for long stages: count, throughput, ETA, failures, at most one line every few seconds."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    """``130`` → ``2m10s``, ``4000`` → ``1h06m``, ``7`` → ``7s`` (what an ETA needs, no more)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(done: int, total: int, elapsed: float) -> str:
    """The remaining time at the rate so far; ``?`` before anything is done."""
    if done <= 0:
        return "?"
    return format_duration(elapsed / done * max(total - done, 0))


class Progress:
    def __init__(self, stage: str, total: int, unit: str = "images", every_s: float = 30.0) -> None:
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done = self.failed = 0
        self._printed = -1  # the count last printed: a caller's final print() after the automatic one is skipped
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

    def line(self) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        remaining = "done" if self.done >= self.total else f"ETA {eta(self.done, self.total, self.elapsed)}"
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"[{self.stage}] {self.done}/{self.total} {self.unit} ({pct:.0f}%), {self.rate:.2f} {self.unit}/s, "
                f"{remaining}{failed}, {format_duration(self.elapsed)}")

    def print(self) -> None:
        if self.done == self._printed:
            return
        self._printed = self.done
        print(self.line(), file=sys.stderr, flush=True)


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)
