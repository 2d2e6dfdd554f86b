"""``bench shutdown``: SIGTERM to our worker and to stock Celery signal handling, the same
operations in flight, SIGKILL after the grace period as Docker does."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench.common import migrated, workspace
from devtools.launcher import WorkerProcess


def _stop_run(app: Any, env: dict[str, str], tmp: Path, queue: str, *, op_seconds: float,
              grace: float) -> dict[str, Any]:
    """One worker, two canaries in flight, SIGTERM; SIGKILL after ``grace`` like Docker."""
    worker = WorkerProcess(env, name=queue, log_path=tmp / f"{queue}.log", concurrency=2,
                           queue=queue).start()
    jobs = [app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": op_seconds})
            for _ in range(2)]
    deadline = time.monotonic() + 60
    while sum(j.state == "STARTED" for j in jobs) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the canaries' transactions
    pids = [worker.pid, *worker.children()]
    started = time.perf_counter()
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.proc is not None
    try:
        worker.proc.wait(grace)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.proc.wait()
        killed = True
    seconds = time.perf_counter() - started
    broker = redis.Redis.from_url(env["REDIS_URL"])
    queued = int(broker.llen(queue))
    broker.close()
    temp_dir = Path(env["REPOINDEX_TEMP_DIR"])
    temp_left = [n for n in os.listdir(temp_dir)
                 if n.split("-", 1)[0].isdigit() and int(n.split("-", 1)[0]) in pids] \
        if temp_dir.exists() else []
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        done = conn.execute("SELECT count(*) FROM canary WHERE job_id = ANY(%s)",
                            ([j.id for j in jobs],)).fetchone()
    completed = int(done[0]) if done else 0
    succeeded = sum(j.state == "SUCCESS" for j in jobs)
    return {"seconds": seconds, "killed": killed, "completed": completed, "requeued": queued,
            "not_accounted": 2 - completed - queued, "temp_left": len(temp_left),
            "half_written": completed - succeeded}


def bench_shutdown(runs: int, op_seconds: float, grace: float,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Ours (REMAP_SIGTERM=SIGQUIT, cold path) vs stock Celery signal handling (warm
    shutdown), same app and operations, alternated; SIGKILL after ``grace`` as Docker does."""
    with workspace() as ws:
        samples: dict[str, list[dict[str, Any]]] = {"ours": [], "stock": []}
        migrated(ws.endpoints.database_url)
        for run in range(runs):
            for mode, remap in (("ours", "SIGQUIT"), ("stock", "")):
                queue = f"shutdown-{mode}-{run}-{os.getpid()}"
                result = _stop_run(ws.app, {**ws.env, "REMAP_SIGTERM": remap}, ws.tmp, queue,
                                   op_seconds=op_seconds, grace=grace)
                samples[mode].append(result)
                echo(f"run {run + 1}/{runs} {mode}: exit after {result['seconds']:.2f}s"
                     f"{' (SIGKILL)' if result['killed'] else ''}, completed "
                     f"{result['completed']}, requeued {result['requeued']}, "
                     f"temp left {result['temp_left']}")
    summary = {mode: {"median_s": statistics.median(r["seconds"] for r in rows),
                      "max_s": max(r["seconds"] for r in rows),
                      "sigkilled": sum(r["killed"] for r in rows),
                      "jobs_not_accounted": sum(r["not_accounted"] for r in rows),
                      "temp_left": sum(r["temp_left"] for r in rows),
                      "half_written": sum(r["half_written"] for r in rows)}
               for mode, rows in samples.items()}
    return {"runs": runs, "op_seconds": op_seconds, "grace": grace, "summary": summary,
            "samples": samples}
