"""Load on a real fleet: many operations in flight at once across worker replicas, with
what the server and the children hold measured while they run (used by the load test and
by ``repoindex bench all`` / ``bench replicas``)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg

from devtools.launcher import WorkerProcess
from tasks.store import GC_LOCK
from workers.client import fleet_stats
from workers.metrics import WAIT_BUCKETS, quantile


@contextlib.contextmanager
def fleet(env: Mapping[str, str], logs: Path, *, replicas: int, concurrency: int, queue: str,
          name: str = "fleet", app: str = "workers.app",
          wrap: Sequence[str] = ()) -> Iterator[list[WorkerProcess]]:
    """``replicas`` worker replicas of ``concurrency`` children on one queue, started at
    once (through ``wrap``, e.g. in a network namespace); all stopped (SIGTERM, as in
    production) on the way out."""
    workers = [WorkerProcess(env, name=f"{name}{i}-{queue}", log_path=logs / f"{name}{i}.log",
                             concurrency=concurrency, queue=queue, app=app, wrap=wrap)
               for i in range(replicas)]
    try:
        for worker in workers:
            worker.start(wait=False)
        for worker in workers:
            worker.wait_for_log(" ready.", 120)
        yield workers
    finally:
        for worker in workers:
            worker.stop()


class Peaks:
    """Samples, every ``period`` s on a thread of its own, the server sessions of our
    application and every child's open fds and fd limit; keeps the maxima."""

    def __init__(self, database_url: str, workers: list[WorkerProcess],
                 period: float = 0.05) -> None:
        self.database_url = database_url
        self.workers = workers
        self.period = period
        self.connections = 0
        self.fds = 0
        self.fd_limit = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-peaks", daemon=True)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                   " application_name = 'repoindex'").fetchone()
                self.connections = max(self.connections, int(row[0]) if row else 0)
                for worker in self.workers:
                    for pid in worker.children():
                        with contextlib.suppress(psutil.Error):
                            proc = psutil.Process(pid)
                            self.fds = max(self.fds, proc.num_fds())
                            self.fd_limit = proc.rlimit(psutil.RLIMIT_NOFILE)[0]
                self._stop.wait(self.period)


def overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda ev: (ev[0], ev[1]))
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def pool_waits(app: Any, workers: list[WorkerProcess], operations: int,
               timeout: float = 30) -> dict[str, float | None]:
    """p50/p99 of the fleet's pool checkout waits (bucket upper bounds), from the
    replicas' ``repoindex_stats`` replies, once ``operations`` have been published (a
    child publishes right after it sent the result, so a moment after ``get()``)."""
    deadline = time.monotonic() + timeout
    while True:
        docs = fleet_stats(app, timeout=2, destination=[w.node for w in workers])
        done = sum(n for doc in docs for _, _, n in doc["totals"]["operations"])
        if done >= operations or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    counts = [0] * (len(WAIT_BUCKETS) + 1)
    for doc in docs:
        for i, n in enumerate(doc["totals"]["pool_wait"]["buckets"]):
            counts[i] += n
    return {"p50_s": quantile(WAIT_BUCKETS, counts, 0.5),
            "p99_s": quantile(WAIT_BUCKETS, counts, 0.99), "checkouts": float(sum(counts))}


def concurrent_run(app: Any, workers: list[WorkerProcess], queue: str, database_url: str,
                   repos: list[Path], *, gate_timeout: float = 300) -> dict[str, Any]:
    """One index operation per repository, all in flight at the same moment; what it took
    and held.

    The moment is made, not hoped for: this process holds the blob lock exclusively (as
    garbage collection would), so every operation starts, takes its connection and its
    repository lock, and waits for the lock in the same place; once all are waiting the
    lock is released and they run on together.
    """
    started = time.perf_counter()
    with Peaks(database_url, workers) as peaks, \
            psycopg.connect(database_url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s, 0)", (GC_LOCK,))
        jobs = [app.send_task("repoindex.index_repository", queue=queue,
                              kwargs={"source": str(repo), "name": f"load-{repo.name}"})
                for repo in repos]
        deadline = time.monotonic() + gate_timeout
        waiting = 0
        while time.monotonic() < deadline:
            row = gate.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                               " AND classid = %s AND objid = 0 AND NOT granted",
                               (GC_LOCK,)).fetchone()
            waiting = int(row[0]) if row else 0
            if waiting >= len(jobs) or any(j.ready() for j in jobs):
                break
            time.sleep(0.05)
        gate_s = time.perf_counter() - started
        gate.execute("SELECT pg_advisory_unlock(%s, 0)", (GC_LOCK,))
        for job in jobs:
            job.get(timeout=600, propagate=False)
    wall = time.perf_counter() - started
    errors = [str(j.result) for j in jobs if j.state != "SUCCESS"]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT started_at, finished_at FROM runs WHERE job_id = ANY(%s)",
                            ([j.id for j in jobs],)).fetchall()
    return {
        "operations": len(jobs), "succeeded": len(jobs) - len(errors), "errors": errors,
        "waiting_together": waiting, "gate_s": gate_s,
        "in_flight_at_once": overlap([(r[0], r[1]) for r in rows if r[1] is not None]),
        "ledger_rows": len(rows), "peak_server_connections": peaks.connections,
        "peak_child_fds": peaks.fds, "fd_limit": peaks.fd_limit, "wall_s": wall,
        "pool_wait": pool_waits(app, workers, len(jobs)),
    }


def throughput(app: Any, queue: str, repos: list[Path], rounds: int = 1) -> float:
    """Operations per second of ``rounds`` passes of one index job per repository."""
    started = time.perf_counter()
    jobs = [app.send_task("repoindex.index_repository", queue=queue,
                          kwargs={"source": str(repo), "name": f"tp-{repo.name}-{r}"})
            for r in range(rounds) for repo in repos]
    for job in jobs:
        job.get(timeout=600)
    return len(jobs) / (time.perf_counter() - started)
