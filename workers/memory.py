"""Memory of a worker child: release after each operation, watch the floor, contain.

- ``release()`` runs after every operation: a full ``gc.collect()`` and glibc's
  ``malloc_trim(0)``, which returns freed heap pages to the OS (CPython's allocator keeps
  them otherwise, so RSS would stay at the operation's peak).
- ``LeakDetector`` is neither blind nor jumpy: after a warm-up, it takes the *floor*
  (minimum post-release RSS) of each window of operations; a leak is suspected only when
  that floor grew by more than a threshold in every one of N consecutive windows. One
  high reading (a big repository) raises no floor; a real leak raises every one.
- Containment is Celery's ``worker_max_memory_per_child`` (peak RSS checked after each
  task, so a child is replaced between operations, never during one); ``recycle_reason``
  tells the log why a child is about to go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import itertools
import logging
import os
import resource
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("repoindex.memory")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): GC alone
        return None


_malloc_trim = _load_malloc_trim()


def rss() -> int:
    """Resident set size of this process, in bytes (from /proc: cheap)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def proc_status(pid: int | str, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss() -> int:
    """Peak RSS of this process so far, in bytes (what worker_max_memory_per_child checks)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release() -> None:
    """Drop garbage and give freed heap back to the OS."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def recycle_reason(limit_bytes: int) -> str | None:
    """Why billiard will replace this child after the current task, if it will."""
    if limit_bytes and peak_rss() > limit_bytes:
        return f"memory peak_rss={peak_rss() // 2**20}MiB limit={limit_bytes // 2**20}MiB"
    return None


@dataclass
class LeakDetector:
    """Suspects a leak when the RSS floor grows in ``windows`` consecutive windows."""

    warmup: int = 20
    window: int = 50
    windows: int = 3
    min_growth: int = 1 << 20
    trace_dir: Path | None = None  # with tracemalloc on: where the top-N diff goes
    report: Callable[[str], None] | None = None
    suspected: int = 0
    evaluated: int = 0  # windows closed and compared (a time-driven event of the soak)
    floors: list[int] = field(default_factory=list)
    _seen: int = 0
    _current: int | None = None
    _in_window: int = 0
    _snapshot: tracemalloc.Snapshot | None = None

    def observe(self, value: int) -> str | None:
        """Feed one post-release RSS reading; returns the warning text when suspected."""
        self._seen += 1
        if self._seen <= self.warmup:
            if self._seen == self.warmup and self.trace_dir is not None:
                self._snapshot = _snapshot()
            return None
        self._current = value if self._current is None else min(self._current, value)
        self._in_window += 1
        if self._in_window < self.window:
            return None
        self.floors.append(self._current)
        self.evaluated += 1
        self._current, self._in_window = None, 0
        recent = self.floors[-(self.windows + 1):]
        if len(recent) <= self.windows or not all(
                b - a > self.min_growth for a, b in itertools.pairwise(recent)):
            return None
        return self._suspect(recent)

    def _suspect(self, recent: list[int]) -> str:
        self.suspected += 1
        growth = recent[-1] - recent[0]
        per_op = growth / (self.windows * self.window)
        text = (f"suspected memory leak pid={os.getpid()} rss_floor_mib="
                f"{[round(f / 2**20, 1) for f in recent]} growth={growth // 1024}KiB"
                f" per_op={per_op / 1024:.1f}KiB over {self.windows} windows of {self.window}"
                " operations")
        diff = self._write_diff()
        if diff is not None:
            text += f" allocations={diff}"
        self.floors = self.floors[-1:]  # report again only if it goes on growing
        log.warning("%s", text)
        if self.report is not None:
            self.report(text)
        return text

    def _write_diff(self) -> Path | None:
        if self.trace_dir is None or self._snapshot is None:
            return None
        now = _snapshot()
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"memory-{os.getpid()}-{int(time.time())}.txt"
        stats = now.compare_to(self._snapshot, "lineno")[:25]
        path.write_text("".join(f"{s}\n" for s in stats), encoding="utf-8")
        self._snapshot = now
        return path


def _snapshot() -> tracemalloc.Snapshot:
    if not tracemalloc.is_tracing():
        tracemalloc.start(10)
    return tracemalloc.take_snapshot()


def uss() -> int:
    """Unique set size (what this process alone owns); ~0.3 ms, for the sampler only."""
    return int(psutil.Process().memory_full_info().uss)
