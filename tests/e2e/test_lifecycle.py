"""Every operation releases everything it acquired: real prefork children, checked from
outside (/proc of each child, pg_stat_activity) and from inside (pool stats, sentinel)."""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.launcher import WorkerProcess
from tests.conftest import run, start_worker
from tests.e2e.support import (
    assert_same,
    fleet_state,
    inside_states,
    leak_lines,
    send,
    server_sessions,
    settle,
    warm_up,
)


@pytest.fixture(scope="module")
def lifecycle_worker(probe_table: None) -> Iterator[WorkerProcess]:
    proc = start_worker("lifecycle", concurrency=2, queue="lifecycle")
    yield proc
    assert proc.stop() == 0


def test_scenario1_fifty_files_back_to_baseline(lifecycle_worker: WorkerProcess, celery_app: Any,
                                                temp_root: Path) -> None:
    """After operations that open 50 files each, every child's fds equal its baseline."""
    warm_up(celery_app, lifecycle_worker)
    baseline = fleet_state(lifecycle_worker, temp_root)
    jobs = [send(celery_app, lifecycle_worker, "probe.open_files", n=50) for _ in range(6)]
    results = [j.get(timeout=60) for j in jobs]
    assert all(r["live"]["files"] == 50 for r in results)
    assert_same(fleet_state(lifecycle_worker, temp_root), baseline)
    assert leak_lines(lifecycle_worker) == []


def test_scenario2_failure_releases_everything(lifecycle_worker: WorkerProcess, celery_app: Any,
                                               db: psycopg.Connection[Any],
                                               temp_root: Path) -> None:
    """Files, a connection mid-transaction, temp files, a git process, a thread; then a
    failure: all released, transaction rolled back, error and cleanup logged and recorded."""
    warm_up(celery_app, lifecycle_worker)
    baseline = fleet_state(lifecycle_worker, temp_root)
    res = run(celery_app, "probe.everything", queue="lifecycle", tag="scenario2", fail_at="end")
    assert res.state == "FAILURE" and "injected failure at end" in str(res.result)
    assert_same(fleet_state(lifecycle_worker, temp_root), baseline)
    assert db.execute("SELECT count(*) FROM probe_rows WHERE tag = 'scenario2'").fetchone() == (0,)
    assert server_sessions(db) == []
    for state in inside_states(celery_app, lifecycle_worker).values():
        assert state["pool"]["checked_out"] == 0
        assert state["leaks"] == {}
    lines = [ln for ln in lifecycle_worker.log().splitlines() if f"op={res.id} " in ln]
    failed = next(ln for ln in lines if "operation failed error=" in ln)
    # job and repository named once, by the cleanup report; not repeated at the end
    assert re.search(r"ERROR .*: operation failed error=.*injected failure at end.*; "
                     rf"cleanup op={res.id} repo=- outcome=failed files=5 connections=1 temp=3 "
                     r"processes=1 threads=1 tasks=0 failures=0 ms=\d+\.\d$", failed), failed
    cleanup = next(ln for ln in lines if "repoindex.cleanup: cleanup op=" in ln)
    assert re.search(rf"repoindex.cleanup: cleanup op={res.id} repo=- outcome=failed .* "
                     r"failures=0 ms=\d+\.\d$", cleanup), cleanup
    assert all(ln.count("job=") == 0 and ln.count("op=") == 1 for ln in (failed, cleanup))
    ledger = db.execute("SELECT state, error, cleanup FROM runs WHERE job_id = %s",
                        (res.id,)).fetchone()
    assert ledger is not None
    assert ledger[0] == "failed" and "injected failure at end" in ledger[1]
    assert ledger[2]["acquired"]["connections"] == 1 and ledger[2]["failures"] == []
    assert leak_lines(lifecycle_worker) == []


def test_scenario3_concurrent_operations_clean_only_their_own(
        probe_table: None, celery_app: Any, db: psycopg.Connection[Any],
        temp_root: Path) -> None:
    """5 operations at once, finishing in random order: all succeed, all back to baseline."""
    worker = start_worker("concurrent", concurrency=5, queue="concurrent")
    try:
        warm_up(celery_app, worker)
        baseline = fleet_state(worker, temp_root)
        rng = random.Random(7)
        jobs = [send(celery_app, worker, "probe.everything", tag=f"c{i}",
                     sleep=rng.uniform(0.2, 1.0)) for i in range(5)]
        results = [j.get(timeout=60) for j in jobs]
        assert len({r["pid"] for r in results}) >= 3  # really concurrent, in several children
        assert all(r["live"]["connections"] == 1 and r["live"]["processes"] == 1
                   for r in results)
        assert_same(fleet_state(worker, temp_root), baseline)
        assert db.execute("SELECT count(*) FROM probe_rows WHERE tag LIKE 'c_'"
                          ).fetchone() == (5,)
        assert server_sessions(db) == []
        for state in inside_states(celery_app, worker).values():
            assert state["pool"]["checked_out"] == 0
            assert state["pool"]["pool_available"] == state["pool"]["pool_size"]
        assert leak_lines(worker) == []
    finally:
        assert worker.stop() == 0


def test_sentinel_catches_leaks(lifecycle_worker: WorkerProcess, celery_app: Any) -> None:
    """An operation that leaks an fd or a thread is named in a WARNING and counted."""
    fd_job = run(celery_app, "probe.leak_fd", queue="lifecycle")
    thread_job = run(celery_app, "probe.leak_thread", queue="lifecycle")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(leak_lines(lifecycle_worker)) < 2:
        time.sleep(0.1)
    log = lifecycle_worker.log()
    assert fd_job.state == "SUCCESS" and thread_job.state == "SUCCESS"
    mine = "\n".join(ln for ln in log.splitlines() if fd_job.id in ln or "Error" in ln)
    assert re.search(rf"leak op={fd_job.id} kind=fd fd={fd_job.result} target=\S+leaked-\d+\.txt",
                     log), mine
    assert re.search(rf"leak op={thread_job.id} kind=thread thread=probe-leaked-thread", log)
    counts: dict[str, int] = {}
    for state in inside_states(celery_app, lifecycle_worker).values():
        for kind, n in state["leaks"].items():
            counts[kind] = counts.get(kind, 0) + n
    assert counts == {"fd": 1, "thread": 1}


VOLUME = int(os.environ.get("REPOINDEX_VOLUME_OPS", "1000"))  # 10000 for the run


def test_volume_of_operations_ten_percent_failing_some_cancelled(
        probe_table: None, celery_app: Any, db: psycopg.Connection[Any], temp_root: Path,
        tmp_path: Path) -> None:
    """VOLUME operations (default 1,000; ``REPOINDEX_VOLUME_OPS=10000`` for the long run)
    through a fleet of two replicas x two children, 10 % failing at random points, the
    last 5 % cancelled (revoked) while queued: every child exactly at baseline, no leak,
    each job run exactly once, or never if its cancellation came first."""
    from bench.load import fleet

    queue = f"volume-{uuid.uuid4().hex[:6]}"
    with fleet(dict(os.environ), tmp_path, replicas=2, concurrency=2, queue=queue,
               name="volume", app="tests.app") as workers:
        for worker in workers:
            warm_up(celery_app, worker)
        settle(celery_app, workers)
        baseline = {w.name: fleet_state(w, temp_root) for w in workers}
        jobs = [celery_app.send_task("probe.random_op", queue=queue, kwargs={"seed": s})
                for s in range(VOLUME)]
        cancelled = jobs[-VOLUME // 20:]
        for job in cancelled:
            job.revoke()
        for job in jobs:
            job.get(timeout=VOLUME, propagate=False)
        ran = {job.id for job in jobs if job.state in ("SUCCESS", "FAILURE")}
        revoked = {job.id for job in jobs if job.state == "REVOKED"}
        assert len(ran) + len(revoked) == VOLUME
        assert revoked and revoked <= {j.id for j in cancelled}
        rows = dict(db.execute("SELECT job_id, count(*) FROM runs WHERE job_id = ANY(%s)"
                               " GROUP BY job_id", ([j.id for j in jobs],)).fetchall())
        assert set(rows) == ran and set(rows.values()) == {1}, "a job ran twice or was lost"
        should_fail = {jobs[s].id for s in range(VOLUME) if random.Random(s).random() < 0.1}
        assert {j.id for j in jobs if j.state == "FAILURE"} == should_fail & ran
        assert server_sessions(db) == []
        for worker in workers:
            assert_same(fleet_state(worker, temp_root), baseline[worker.name])
            for state in inside_states(celery_app, worker).values():
                assert state["pool"]["checked_out"] == 0
                assert state["leaks"] == {}, "\n".join(leak_lines(worker))
            assert leak_lines(worker) == []
