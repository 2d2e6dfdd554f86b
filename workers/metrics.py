"""Resource and outcome figures of one worker replica, per child, for Prometheus,
``inspect stats``, Flower and ``repoindex stats``.

Why not prometheus_client's multiprocess mode: it keeps one mmap file per metric type per
pid for ever (counters of dead children must stay, or their counts vanish), so a worker
recycling children grows its directory without bound, and it needs the environment set
before any import. Here each prefork child publishes one small JSON snapshot of its own
counters (``<stats dir>/<pid>.json``, written atomically after each operation); the main
process reads the live children's files plus ``/proc`` for fds/RSS/USS/threads, and folds
the file of a child that has gone into the replica's ``retired`` totals before deleting it.
So: no series lost when a child is replaced (counters are per replica, monotonic), no
stale per-child series (those come only from live children), and at most one file per
live child. prometheus_client still does the exposition and the HTTP server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from workers.processes import running_child

log = logging.getLogger("repoindex.metrics")
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0)
# Label values present from the start at 0: an alert on increase() cannot see the first
# event of a series that appears with value 1 (no earlier sample to compare with).
RECYCLE_REASONS = ("memory", "max_tasks", "died")
CLEANUP_OUTCOMES = ("clean", "failed")
POOL_KEYS = ("pool_max", "pool_size", "pool_available", "requests_waiting", "checked_out")


def stats_dir(temp_dir: Path, main_pid: int) -> Path:
    """Where the children of the worker whose main process is ``main_pid`` publish."""
    return temp_dir / f"stats-{main_pid}"


def is_bookkeeping_fd(path: str) -> bool:
    """An fd a child's own bookkeeping holds for a moment, for fd counts read from outside
    to skip: its stats file (or its temp copy), rewritten in ~0.1 ms after each operation
    and sample, and the /proc files its sampler and sentinel read (a compressed soak's
    sampler reads every ~0.1 s, so a reading from outside catches them open now and then).
    Neither is a resource of any operation."""
    return "/stats-" in path or path.startswith("/proc/")


# -- counters, in a child and summed in the main process ----------------------------------
@dataclass
class Histogram:
    """Bucket counts (the last is +Inf) and the sum of observations; JSON as
    ``{"buckets": [...], "sum": x}``, added up across children."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b),
                         len(self.bounds))] += 1
        self.total += value

    def add(self, doc: Mapping[str, Any]) -> None:
        self.counts = [a + b for a, b in zip(self.counts, doc["buckets"], strict=True)]
        self.total += doc["sum"]

    def as_doc(self) -> dict[str, Any]:
        return {"buckets": list(self.counts), "sum": self.total}

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count so far) pairs, as Prometheus histograms want them."""
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (inf past the last)."""
    total = sum(counts)
    if not total:
        return None
    running = 0
    for bound, n in zip([*bounds, float("inf")], counts, strict=True):
        running += n
        if running >= q * total:
            return bound
    return float("inf")  # pragma: no cover - running reaches total


@dataclass
class Totals:
    """Counters of one child, or of a replica (retired children plus live ones)."""

    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    durations: dict[str, Histogram] = field(default_factory=dict)
    cleanups: Counter[str] = field(default_factory=Counter)
    leaks: Counter[str] = field(default_factory=Counter)
    recycles: Counter[str] = field(default_factory=Counter)
    returns_bad: int = 0
    events: Counter[str] = field(default_factory=Counter)  # time-driven events, by name
    wait: Histogram = field(default_factory=lambda: Histogram(WAIT_BUCKETS))

    def duration(self, task: str) -> Histogram:
        return self.durations.setdefault(task, Histogram(BUCKETS))

    def add(self, doc: Mapping[str, Any]) -> None:
        for task, outcome, n in doc.get("operations", []):
            self.operations[(task, outcome)] += n
        for task, hist in doc.get("durations", {}).items():
            self.duration(task).add(hist)
        self.cleanups.update(doc.get("cleanups", {}))
        self.leaks.update(doc.get("leaks", {}))
        self.recycles.update(doc.get("recycles", {}))
        self.returns_bad += int(doc.get("returns_bad", 0))
        self.events.update(doc.get("events", {}))
        if "pool_wait" in doc:
            self.wait.add(doc["pool_wait"])

    def copy(self) -> Totals:
        out = Totals()
        out.add(self.as_doc())
        return out

    def as_doc(self) -> dict[str, Any]:
        return {
            "operations": [[t, o, n] for (t, o), n in sorted(self.operations.items())],
            "durations": {t: h.as_doc() for t, h in self.durations.items()},
            "cleanups": dict(self.cleanups), "leaks": dict(self.leaks),
            "recycles": dict(self.recycles), "returns_bad": self.returns_bad,
            "events": dict(self.events),
            "pool_wait": self.wait.as_doc(),
        }


# -- child side --------------------------------------------------------------------------
@dataclass
class ChildStats:
    """Counters of one prefork child, published as ``<directory>/<pid>.json``."""

    directory: Path | None = None  # None: not a prefork child; counts kept, nothing written
    counts: Totals = field(default_factory=Totals)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_wait(self, seconds: float) -> None:
        """How long one pool checkout waited for a connection."""
        with self._lock:
            self.counts.wait.observe(seconds)

    def event(self, name: str, n: int = 1) -> None:
        """A time-driven event of this child (a sample taken, a pool connection replaced)."""
        with self._lock:
            self.counts.events[name] += n

    def record(self, task: str, outcome: str, seconds: float, cleanup_failures: int) -> None:
        """One finished operation (any outcome)."""
        with self._lock:
            self.counts.operations[(task, outcome)] += 1
            self.counts.duration(task).observe(seconds)
            self.counts.cleanups["failed" if cleanup_failures else "clean"] += 1

    def document(self, *, leaks: Mapping[str, int], pool: Mapping[str, int],
                 returns_bad: int, exit: str | None = None,
                 events: Mapping[str, int] | None = None) -> dict[str, Any]:
        with self._lock:
            doc = self.counts.as_doc()
            doc["events"] = {**doc["events"], **(events or {})}
            return {**doc, "pid": os.getpid(), "ts": time.time(),
                    "exit": exit, "leaks": dict(leaks), "returns_bad": returns_bad,
                    "pool": {k: int(pool.get(k, 0)) for k in POOL_KEYS}}

    def publish(self, doc: dict[str, Any]) -> None:
        """Atomically replace this child's file (no-op outside a prefork child)."""
        if self.directory is None:
            return
        path = self.directory / f"{doc['pid']}.json"
        tmp = path.with_name(f".{doc['pid']}.{threading.get_ident()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:  # figures are best effort; the operation is not affected
            log.warning("could not publish worker-child stats to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()


# -- main-process side ---------------------------------------------------------------------
def process_figures(pid: int) -> dict[str, int] | None:
    """fds, fd limit, RSS, USS and threads of a live process, read from /proc."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            mem = proc.memory_full_info()
            return {"fds": proc.num_fds(), "fd_limit": proc.rlimit(psutil.RLIMIT_NOFILE)[0],
                    "rss": mem.rss, "uss": mem.uss, "threads": proc.num_threads()}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _recycle_reason(exit: str | None, *, stopping: bool) -> str | None:
    """Why a child that has gone was replaced. Its last word (``exit``) is ``memory`` when it
    passed REPOINDEX_MAX_MEMORY_PER_CHILD_MB, ``clean`` when billiard ended it otherwise
    (max tasks per child, or the worker stopping), missing when it was killed."""
    if exit == "memory":
        return "memory"
    if stopping:
        return None
    return "max_tasks" if exit == "clean" else "died"


class WorkerMetrics:
    """The main process's view of its children; thread-safe; ``fold()`` is idempotent."""

    def __init__(self, directory: Path, *, worker: str, memory_limit: int,
                 children: Callable[[], list[int]],
                 on_died: Callable[[str, int], None] | None = None) -> None:
        self.on_died = on_died
        self.directory = directory
        self.worker = worker
        self.memory_limit = memory_limit
        self.children = children
        self.retired = Totals()
        self.stopping = False
        self._lock = threading.Lock()

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return doc
        except (OSError, ValueError):
            return None

    def fold(self, live: set[int] | None = None) -> dict[int, dict[str, Any]]:
        """Fold the files of children that have gone; return the live children's docs."""
        live = set(self.children()) if live is None else live
        docs: dict[int, dict[str, Any]] = {}
        with self._lock:
            try:
                paths = sorted(self.directory.glob("*.json"))
            except OSError:
                paths = []
            for path in paths:
                pid = int(path.stem) if path.stem.isdigit() else -1
                doc = self._read(path)
                if pid in live:
                    if doc is not None:
                        docs[pid] = doc
                    continue
                if running_child(pid):
                    continue  # not listed yet: folded once it has gone
                if doc is not None:
                    self.retired.add(doc)
                    reason = _recycle_reason(doc.get("exit"), stopping=self.stopping)
                    if reason is not None:
                        self.retired.recycles[reason] += 1
                    if reason == "died":
                        log.warning("worker child pid=%d ended without shutting down "
                                    "(killed or crashed); its counters are kept", pid)
                        if self.on_died is not None:
                            self.on_died(self.worker, pid)
                with contextlib.suppress(OSError):
                    path.unlink()
        return docs

    def snapshot(self) -> dict[str, Any]:
        """Everything this replica knows, as one JSON-able document."""
        live = sorted(self.children())
        docs = self.fold(set(live))
        with self._lock:
            totals = self.retired.copy()
        children = []
        for pid in live:
            figures = process_figures(pid)
            if figures is None:
                continue
            doc = docs.get(pid, {})
            totals.add(doc)
            ops = sum(n for _, _, n in doc.get("operations", []))
            children.append({"pid": pid, **figures, "operations": ops,
                             "pool": doc.get("pool", {k: 0 for k in POOL_KEYS})})
        return {"worker": self.worker, "pid": os.getpid(), "memory_limit": self.memory_limit,
                "children": children, "totals": totals.as_doc()}
