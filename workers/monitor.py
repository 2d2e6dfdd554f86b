"""The worker's main-process monitoring: a bootstep that serves ``/metrics``, adds the
replica's resource state to ``inspect stats`` (and so to Flower's worker page), and the
``repoindex_stats`` remote-control command behind ``repoindex stats``.

Only the main process serves: it reads its children from ``/proc`` and their published
counters (``workers.metrics``). The HTTP server is prometheus_client's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import Counter
from typing import Any

import psutil
from celery import bootsteps
from celery.worker.control import inspect_command

from workers import alerts, metrics, metrics_export, runtime, shutdown
from workers.settings import Settings, process_settings

log = logging.getLogger("repoindex.monitor")
_inherited: list[Any] = []  # the listening socket, closed in children after fork
FOLD_SECONDS = 2.0


def close_inherited() -> None:
    """In a freshly forked child: close the main process's listening socket copy."""
    for server in _inherited:
        with contextlib.suppress(OSError):
            server.socket.close()
    _inherited.clear()


class Monitor(bootsteps.StartStopStep):
    """Started after the pool, stopped before it (so children leaving at shutdown are not
    counted as recycled)."""

    label = "repoindex monitor"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.metrics: metrics.WorkerMetrics | None = None
        self.server: Any = None
        self.server_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._folder: threading.Thread | None = None

    def create(self, worker: Any) -> None:
        worker.repoindex_monitor = self

    def start(self, worker: Any) -> None:
        shutdown.guard_startup(worker)
        settings = process_settings()
        runtime.sweep_temp(settings.temp_dir)
        me = psutil.Process()
        self.metrics = metrics.WorkerMetrics(
            metrics.stats_dir(settings.temp_dir, os.getpid()), worker=worker.hostname,
            memory_limit=settings.max_memory_per_child_mb * 2**20,
            children=lambda: [c.pid for c in me.children()], on_died=alerts.report_child_died)
        # made here, not at a child's first publish: from "ready" on, the temp directory
        # holds the worker's own stats directory (and no sweep takes it for a dead one's)
        with contextlib.suppress(OSError):  # figures are best effort, as publish's are
            self.metrics.directory.mkdir(parents=True, exist_ok=True)
        alerts.init(settings.sentry_dsn)  # the main process's own errors and reports
        self._stop.clear()
        self._folder = threading.Thread(target=self._fold_loop, name="repoindex-metrics-fold",
                                        daemon=True)
        self._folder.start()
        if settings.metrics_port:
            self._serve(settings)

    def _serve(self, settings: Settings) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        assert self.metrics is not None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics_export.Collector(self.metrics))
        try:
            self.server, self.server_thread = start_http_server(
                settings.metrics_port, addr=settings.metrics_addr, registry=registry)
        except OSError as exc:
            log.error("metrics: cannot serve on %s:%d (%s); the worker runs without /metrics",
                      settings.metrics_addr, settings.metrics_port, exc)
            return
        _inherited.append(self.server)
        log.info("metrics: serving http://%s:%d/metrics", settings.metrics_addr,
                 settings.metrics_port)

    def _fold_loop(self) -> None:
        # Children replaced while nobody scrapes: their files are folded here, so the
        # directory never holds more than one file per live child (plus a moment).
        while not self._stop.wait(FOLD_SECONDS):
            if self.metrics is not None:
                try:
                    self.metrics.fold()
                except Exception:  # pragma: no cover - keep folding
                    log.exception("metrics: fold failed")

    def stop(self, worker: Any) -> None:
        if self.metrics is not None:
            self.metrics.stopping = True
        self._stop.set()
        if self._folder is not None:
            self._folder.join(FOLD_SECONDS + 5)
            self._folder = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            if self.server_thread is not None:
                self.server_thread.join(5)
            _inherited.clear()
            self.server = None
        if self.metrics is not None:
            shutil.rmtree(self.metrics.directory, ignore_errors=True)

    def terminate(self, worker: Any) -> None:  # what a cold shutdown calls
        self.stop(worker)

    def info(self, worker: Any) -> dict[str, Any]:  # type: ignore[override]
        """Merged into ``inspect stats``: Flower shows each key as one row of the worker
        page's "Other" tab, so the figures go in as labelled rows in human units (the
        same figures as numbers: ``repoindex stats --json``, /metrics)."""
        return labelled_rows(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot() if self.metrics is not None else {}


def labelled_rows(doc: dict[str, Any]) -> dict[str, str]:
    """``repoindex ...`` → text: one row per replica figure, then per child and figure."""
    if not doc:
        return {}
    totals = doc["totals"]
    by_outcome: Counter[str] = Counter()
    for _task, outcome, n in totals["operations"]:
        by_outcome[outcome] += n
    count = sum(sum(h["buckets"]) for h in totals["durations"].values())
    spent = sum(h["sum"] for h in totals["durations"].values())
    rows = {
        "repoindex children": str(len(doc["children"])),
        "repoindex memory limit per child": _mib(doc["memory_limit"]) if doc["memory_limit"]
        else "none",
        "repoindex operations": _counts(by_outcome, ("succeeded", "failed", "retried",
                                                       "interrupted", "revoked")),
        "repoindex operation time (mean)": f"{spent / count:.2f} s over {count} operations"
        if count else "no operations yet",
        "repoindex cleanups": _counts(Counter(totals["cleanups"]), metrics.CLEANUP_OUTCOMES),
        "repoindex leaks": _counts(Counter(totals["leaks"])) or "none",
        "repoindex child recycles": _counts(Counter(totals["recycles"])) or "none",
        "repoindex pool connections returned bad": str(totals["returns_bad"]),
    }
    for child in doc["children"]:
        label = f"repoindex child {child['pid']}"
        pool = child["pool"]
        rows.update({
            f"{label} open files": f"{child['fds']} of {child['fd_limit']}",
            f"{label} memory": f"RSS {_mib(child['rss'])}, USS {_mib(child['uss'])}",
            f"{label} threads": str(child["threads"]),
            f"{label} operations": str(child["operations"]),
            f"{label} database pool": f"{pool['pool_size']} open, {pool['pool_available']} idle,"
                                      f" max {pool['pool_max']}, {pool['requests_waiting']}"
                                      " waiting",
        })
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _counts(counts: Counter[str], keys: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in (keys or tuple(sorted(counts))))


@inspect_command(name="repoindex_stats")
def repoindex_stats(state: Any, **_: Any) -> dict[str, Any]:
    """Per-child resources and per-replica outcomes of this worker (``repoindex stats``)."""
    step = getattr(state.consumer.controller, "repoindex_monitor", None)
    return step.snapshot() if step is not None else {}
