"""The Prometheus families of a replica, from one declarative table.

Each row of ``FAMILIES`` is one family: its name (after ``repoindex_``), type, help, extra
labels (``worker`` is always first) and the function that reads its samples from one
``WorkerMetrics.snapshot()``. Exposing a figure the snapshot already holds is one row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from workers.kinds import LEAK_KINDS
from workers.metrics import (
    BUCKETS,
    CLEANUP_OUTCOMES,
    RECYCLE_REASONS,
    WAIT_BUCKETS,
    Histogram,
    WorkerMetrics,
)

Samples = Iterable[tuple[list[str], Any]]  # (label values after worker, value)


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # gauge, counter or histogram (value: a Histogram)
    help: str
    labels: tuple[str, ...]
    read: Callable[[dict[str, Any]], Samples]


def per_child(key: str, pool: bool = False) -> Callable[[dict[str, Any]], Samples]:
    """A figure of each live child (from /proc, or its pool's statistics)."""
    def read(snap: dict[str, Any]) -> Samples:
        return [([str(c["pid"])], c["pool"].get(key, 0) if pool else c[key])
                for c in snap["children"]]
    return read


def by_label(key: str, known: tuple[str, ...]) -> Callable[[dict[str, Any]], Samples]:
    """A counter of the replica by one label, its ``known`` values present at 0 (an alert
    on increase() cannot see the first event of a series that appears with value 1)."""
    def read(snap: dict[str, Any]) -> Samples:
        values = dict.fromkeys(known, 0) | snap["totals"][key]
        return [([value], n) for value, n in sorted(values.items())]
    return read


def _durations(snap: dict[str, Any]) -> Samples:
    out = []
    for task, data in sorted(snap["totals"]["durations"].items()):
        hist = Histogram(BUCKETS)
        hist.add(data)
        out.append(([task], hist))
    return out


def _pool_wait(snap: dict[str, Any]) -> Samples:
    hist = Histogram(WAIT_BUCKETS)
    hist.add(snap["totals"]["pool_wait"])
    return [([], hist)]


PID = ("pid",)
FAMILIES: tuple[Family, ...] = (
    Family("child_open_fds", "gauge", "Open file descriptors of a worker child.", PID,
           per_child("fds")),
    Family("child_fd_limit", "gauge", "RLIMIT_NOFILE (soft) of a worker child.", PID,
           per_child("fd_limit")),
    Family("child_rss_bytes", "gauge", "Resident set size of a worker child.", PID,
           per_child("rss")),
    Family("child_uss_bytes", "gauge", "Unique set size of a worker child.", PID,
           per_child("uss")),
    Family("child_threads", "gauge", "Threads of a worker child.", PID, per_child("threads")),
    Family("pool_max", "gauge", "Most connections a child's pool may hold.", PID,
           per_child("pool_max", pool=True)),
    Family("pool_size", "gauge",
           "Connections in a child's pool (in use, idle or being made).", PID,
           per_child("pool_size", pool=True)),
    Family("pool_available", "gauge", "Idle connections in a child's pool.", PID,
           per_child("pool_available", pool=True)),
    Family("pool_checked_out", "gauge", "Connections a child's operation holds.", PID,
           per_child("checked_out", pool=True)),
    Family("pool_requests_waiting", "gauge",
           "Requests waiting for a connection in a child's pool.", PID,
           per_child("requests_waiting", pool=True)),
    Family("children", "gauge", "Live prefork children.", (),
           lambda snap: [([], len(snap["children"]))]),
    Family("child_memory_limit_bytes", "gauge",
           "RSS above which a child is replaced after its operation.", (),
           lambda snap: [([], snap["memory_limit"])]),
    Family("operations", "counter", "Operations finished, by task and outcome.",
           ("task", "outcome"),
           lambda snap: [([t, o], n) for t, o, n in snap["totals"]["operations"]]),
    Family("operation_duration_seconds", "histogram", "Wall time of operations, by task.",
           ("task",), _durations),
    Family("cleanups", "counter", "Operation cleanups, by outcome (clean or failed steps).",
           ("outcome",), by_label("cleanups", CLEANUP_OUTCOMES)),
    Family("leaks", "counter", "Leaks detected after operations, by kind.", ("kind",),
           by_label("leaks", LEAK_KINDS)),
    Family("child_recycles", "counter", "Worker children replaced, by reason.", ("reason",),
           by_label("recycles", RECYCLE_REASONS)),
    Family("pool_wait_seconds", "histogram",
           "Time an operation waited for a pooled database connection.", (), _pool_wait),
    Family("time_events", "counter",
           "Time-driven events: samples, pool connections opened, expired (max lifetime) and"
           " closed idle, leak-detector windows evaluated.", ("event",),
           lambda snap: [([e], n) for e, n in sorted(snap["totals"]["events"].items())]),
    Family("pool_returns_bad", "counter", "Connections returned to a pool broken.", (),
           lambda snap: [([], snap["totals"]["returns_bad"])]),
)


class Collector:
    """A prometheus_client collector of a ``WorkerMetrics`` (one snapshot per scrape)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                 "histogram": HistogramMetricFamily}
        snap = self.metrics.snapshot()
        worker = snap["worker"]
        for family in FAMILIES:
            fam = kinds[family.type](f"repoindex_{family.name}", family.help,
                                     labels=["worker", *family.labels])
            for labels, value in family.read(snap):
                if family.type == "histogram":
                    fam.add_metric([worker, *labels], value.cumulative(), value.total)
                else:
                    fam.add_metric([worker, *labels], value)
            yield fam
