"""What one worker process holds for its whole life: settings, pool, sentinel.

A prefork child builds its ``Runtime`` in ``worker_process_init`` (after fork) and closes
it in ``worker_process_shutdown``. Other callers (solo pool, eager tests, the CLI) get one
lazily from ``current()``; ``shutdown()`` closes it either way.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import threading
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from workers import alerts, memory, metrics
from workers.db import Database, migrate
from workers.resources import ResourceManager
from workers.sampler import Sample, Sampler, collect, log_sample
from workers.sentinel import Sentinel
from workers.settings import Settings, process_settings

log = logging.getLogger("repoindex.runtime")
_lock = threading.Lock()
_runtime: Runtime | None = None


def redis_endpoints(*urls: str) -> frozenset[tuple[str, int]]:
    """(ip, port) pairs of the Redis URLs, for the sentinel's socket exemption."""
    found: set[tuple[str, int]] = set()
    for url in urls:
        parts = urlsplit(url)
        if not parts.hostname:
            continue
        port = parts.port or 6379
        try:
            infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        found.update((str(info[4][0]), port) for info in infos)
    return frozenset(found)


def sweep_temp(temp_root: Path, pids: Collection[int] | None = None,
               why: str = "left by dead worker processes") -> list[str]:
    """Remove what processes that died without cleanup (SIGKILL, OOM) left: operation temp
    areas ``<child pid>-...`` and stats directories ``stats-<main pid>``. An area named with
    this process's own pid was left by an earlier process of the same pid (nothing of ours
    exists yet); a stats directory of this pid is this worker's own, in use. With ``pids``:
    only the operation areas of those processes (a main process's own children)."""
    removed: list[str] = []
    try:
        names = os.listdir(temp_root)
    except FileNotFoundError:
        return removed
    for name in names:
        pid_text = name.removeprefix("stats-").split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid, stats = int(pid_text), name.startswith("stats-")
        if pids is not None and (stats or pid not in pids):
            continue
        if (stats or pid != os.getpid()) and psutil.pid_exists(pid):
            continue
        shutil.rmtree(temp_root / name, ignore_errors=True)
        removed.append(name)
    if removed:
        log.warning("swept %d temp area(s) %s: %s", len(removed), why,
                    ", ".join(sorted(removed)))
    return removed


class PoolEvents(logging.Filter):
    """Counts the pool's time-driven events from psycopg_pool's own INFO records (it has no
    counters for them) and keeps those records out of the log (one per checkout); its
    warnings pass. Installed on the ``psycopg.pool`` logger of a worker process."""

    EVENTS = (("discarding expired connection", "pool_connections_expired"),  # max_lifetime
              ("shrinking pool", "pool_connections_idle_closed"),             # max_idle
              ("adding new connection to the pool", "pool_connections_opened"))

    def __init__(self, stats: metrics.ChildStats) -> None:
        super().__init__("psycopg.pool")
        self.stats = stats

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = str(record.msg)
        for prefix, event in self.EVENTS:
            if message.startswith(prefix):
                self.stats.event(event)
        return False


class Runtime:
    """Per-process state; ``start``/``stop`` are idempotent."""

    def __init__(self, settings: Settings, stats_directory: Path | None = None) -> None:
        self.settings = settings
        self.stats = metrics.ChildStats(stats_directory)
        self.exit_reason = "clean"  # the last word published at shutdown
        self.db = Database(settings)
        self.db.observe_waits(self.stats.record_wait)
        self.sentinel = Sentinel(
            temp_root=settings.temp_dir,
            checked_out=lambda: self.db.stats()["checked_out"],
            exempt_sockets=lambda: self.db.pool_sockets,
            endpoints=redis_endpoints(settings.redis_url, settings.result_backend),
            report=alerts.report_leak,
        )
        self.sampler = Sampler(settings.sample_seconds, lambda: collect(self.db.stats),
                               self._on_sample)
        self.leaks = memory.LeakDetector(
            warmup=settings.leak_warmup, window=settings.leak_window,
            windows=settings.leak_windows, min_growth=settings.leak_min_growth_kb * 1024,
            trace_dir=settings.temp_dir / "tracemalloc" if settings.tracemalloc else None,
            report=alerts.report_memory)
        self._schema_ready = False

    def start(self) -> Runtime:
        pool_log = logging.getLogger("psycopg.pool")
        for old in [f for f in pool_log.filters if isinstance(f, PoolEvents)]:
            pool_log.removeFilter(old)  # a child's copy of its parent's, after fork
        pool_log.addFilter(PoolEvents(self.stats))
        pool_log.setLevel(logging.INFO)  # the records must exist to be counted
        alerts.init(self.settings.sentry_dsn)
        self.settings.temp_dir.mkdir(parents=True, exist_ok=True)
        sweep_temp(self.settings.temp_dir)
        self.db.open(wait=False)
        self.sampler.start()
        # Everything alive now (imports, app, config) lives as long as the process: move it
        # out of the collector's sight, so the full collection after each operation costs
        # ~0 ms instead of ~30 ms (and forked pages stay shared).
        gc.freeze()
        return self

    def stop(self) -> None:
        self.sampler.stop()
        self.publish(exit=self.exit_reason)
        self.db.close()

    def _on_sample(self, sample: Sample) -> None:
        log_sample(sample)
        self.stats.event("samples")
        self.publish()  # keeps the pool figures of an idle child fresh

    def publish(self, exit: str | None = None) -> None:
        """This child's counters for the main process (metrics, stats); ~0.01 ms."""
        pool = self.db.stats()
        leaks = dict(self.sentinel.counts)
        if self.leaks.suspected:
            leaks["memory"] = self.leaks.suspected
        self.stats.publish(self.stats.document(
            leaks=leaks, pool=pool, returns_bad=pool["returns_bad"], exit=exit,
            events={"leak_windows_evaluated": self.leaks.evaluated}))

    def ensure_schema(self) -> None:
        """Apply migrations once per process (serialised across processes by a lock)."""
        if not self._schema_ready:
            with self.db.connection() as conn:
                migrate(conn)
            self._schema_ready = True

    def scope(self, op_id: str) -> ResourceManager:
        """A new, unopened resource scope for one operation of this process."""
        return ResourceManager(op_id, pool=self.db.pool, temp_root=self.settings.temp_dir,
                               pool_timeout=self.settings.pool_timeout)


def start(settings: Settings | None = None, *, child_of: int | None = None) -> Runtime:
    """Build and start this process's runtime (in a prefork child: after fork, with
    ``child_of`` the main process, whose metrics read what this child publishes)."""
    global _runtime
    with _lock:
        if _runtime is None:
            settings = settings or process_settings()
            directory = (metrics.stats_dir(settings.temp_dir, child_of)
                         if child_of is not None else None)
            _runtime = Runtime(settings, directory).start()
            _runtime.publish()
        return _runtime


def current() -> Runtime:
    """This process's runtime, started on first use."""
    return _runtime if _runtime is not None else start()


def shutdown() -> None:
    """Stop this process's runtime, if any (idempotent)."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.stop()
            _runtime = None
