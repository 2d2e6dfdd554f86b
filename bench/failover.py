"""``bench failover``: from a replica's SIGKILL to its job running on another replica, ours
(the lease, ``workers.recovery``) against stock Celery settings (Redis's visibility timeout),
the same app and job, alternated."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.common import migrated, workspace
from devtools.launcher import WorkerProcess


def _attempts(database_url: str, job_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM runs WHERE job_id = %s", (job_id,)).fetchone()
    return int(row[0]) if row else 0


def _failover_run(app: Any, env: dict[str, str], tmp: Path, queue: str, *, op_seconds: float,
                  limit: float) -> dict[str, Any]:
    """One replica runs a canary; a second one waits; SIGKILL the first (whole process
    group, as a host crash or the OOM killer of its main process would)."""
    doomed = WorkerProcess(env, name=f"{queue}-doomed", log_path=tmp / f"{queue}-d.log",
                           concurrency=1, queue=queue).start()
    survivor: WorkerProcess | None = None
    try:
        job = app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": op_seconds})
        deadline = time.monotonic() + 60
        while _attempts(env["DATABASE_URL"], job.id) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        survivor = WorkerProcess(env, name=f"{queue}-survivor", concurrency=1, queue=queue,
                                 log_path=tmp / f"{queue}-s.log").start()
        time.sleep(1.0)
        killed = time.monotonic()
        os.killpg(doomed.pid, signal.SIGKILL)
        assert doomed.proc is not None
        doomed.proc.wait()
        seconds: float | None = None
        while time.monotonic() - killed < limit:
            if _attempts(env["DATABASE_URL"], job.id) >= 2:
                seconds = time.monotonic() - killed
                break
            time.sleep(0.1)
        outcome = job.get(timeout=op_seconds + 60, propagate=False) if seconds else None
        return {"seconds": seconds, "state": job.state if outcome is not None else "not rerun",
                "attempts": _attempts(env["DATABASE_URL"], job.id)}
    finally:
        doomed.stop()
        if survivor is not None:
            survivor.stop()


def bench_failover(runs: int, lease: float, stock_visibility: int, op_seconds: float,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Median seconds from SIGKILL to the job running elsewhere, ours vs stock."""
    modes = {"ours": {"REPOINDEX_REPLICA_LEASE": str(lease)},
             "stock": {"REPOINDEX_REPLICA_LEASE": "0",
                       "REPOINDEX_VISIBILITY_TIMEOUT": str(stock_visibility)}}
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with workspace("failover") as ws:
        migrated(ws.endpoints.database_url)
        for run in range(runs):
            for mode, extra in modes.items():
                queue = f"failover-{mode}-{run}-{os.getpid()}"
                result = _failover_run(ws.app, {**ws.env, **extra}, ws.tmp, queue,
                                       op_seconds=op_seconds, limit=stock_visibility + 120)
                samples[mode].append(result)
                shown = f"{result['seconds']:.1f}s" if result["seconds"] else "never"
                echo(f"run {run + 1}/{runs} {mode}: running elsewhere after {shown},"
                     f" {result['state']}, {result['attempts']} ledger rows")
    summary = {}
    for mode, rows in samples.items():
        times = [r["seconds"] for r in rows if r["seconds"] is not None]
        summary[mode] = {"median_s": statistics.median(times) if times else None,
                         "max_s": max(times) if times else None,
                         "not_rerun": sum(r["seconds"] is None for r in rows),
                         "not_succeeded": sum(r["state"] != "SUCCESS" for r in rows)}
    return {"runs": runs, "lease": lease, "stock_visibility_timeout": stock_visibility,
            "summary": summary, "samples": samples}
