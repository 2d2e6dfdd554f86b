"""Every operation releases everything it acquired: real prefork children, checked from
outside (/proc of each child, pg_stat_activity) and from inside (pool stats, sentinel)."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.conftest import run, start_worker
from workers.launcher import WorkerProcess


def child_state(pid: int, temp_root: Path) -> dict[str, Any]:
    """What a worker child holds, read from outside the process."""
    fds = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.add((int(name), os.readlink(f"/proc/{pid}/fd/{name}")))
        except OSError:
            continue
    temp = sorted(n for n in os.listdir(temp_root) if n.startswith(f"{pid}-")) \
        if temp_root.exists() else []
    return {"fds": fds, "threads": len(os.listdir(f"/proc/{pid}/task")),
            "children": [c.pid for c in psutil.Process(pid).children()], "temp": temp}


def fleet_state(worker: WorkerProcess, temp_root: Path) -> dict[int, dict[str, Any]]:
    return {pid: child_state(pid, temp_root) for pid in sorted(worker.children())}


def assert_same(after: dict[int, dict[str, Any]], before: dict[int, dict[str, Any]]) -> None:
    """Equal, or a readable list of what each child gained and lost."""
    assert sorted(after) == sorted(before), "children were replaced"
    diffs = {}
    for pid, state in after.items():
        base = before[pid]
        delta = {k: (sorted(set(state[k]) - set(base[k])), sorted(set(base[k]) - set(state[k])))
                 if k in ("fds", "children", "temp") else (state[k], base[k])
                 for k in state if state[k] != base[k]}
        if delta:
            diffs[pid] = delta
    assert not diffs, f"children differ from their baseline (gained, lost): {diffs}"


def server_sessions(db: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    """(state, count) of our sessions that are not idle (active or idle in transaction)."""
    return db.execute("SELECT state, count(*) FROM pg_stat_activity WHERE application_name ="
                      " 'repoindex' AND state <> 'idle' AND datname = current_database()"
                      " GROUP BY state").fetchall()


def queue_of(worker: WorkerProcess) -> str:
    assert worker.queue is not None
    return worker.queue


def send(app: Any, worker: WorkerProcess, task: str, **kwargs: Any) -> Any:
    """Send to ``worker``'s own queue: the session's shared worker must not take it."""
    return app.send_task(task, kwargs=kwargs, queue=queue_of(worker))


def inside_states(app: Any, worker: WorkerProcess) -> dict[int, dict[str, Any]]:
    """probe.state from every child of ``worker`` (batches until each pid has answered)."""
    wanted, seen = set(worker.children()), {}
    for _ in range(10):
        batch = [send(app, worker, "probe.state", hold=0.3)
                 for _ in range(2 * len(wanted))]
        for r in batch:
            state = r.get(timeout=60)
            seen.setdefault(state["pid"], state)
        if wanted <= set(seen):
            return {pid: seen[pid] for pid in wanted}
    raise AssertionError(f"children {wanted - set(seen)} never answered")


def warm_up(app: Any, worker: WorkerProcess) -> None:
    """First operations open lazy connections (result backend, pool): not leaks. Each
    child must run one, so they are sent at once and each holds its child a moment."""
    n = 2 * len(worker.children())
    results = [send(app, worker, "probe.everything", tag=f"warm{i}", sleep=0.3)
               for i in range(n)]
    for r in results:
        r.get(timeout=60)
    inside_states(app, worker)


@pytest.fixture(scope="module")
def lifecycle_worker(probe_table: None) -> Iterator[WorkerProcess]:
    proc = start_worker("lifecycle", concurrency=2, queue="lifecycle")
    yield proc
    assert proc.stop() == 0


def leak_lines(worker: WorkerProcess) -> list[str]:
    return [ln for ln in worker.log().splitlines()
            if "leak op=" in ln or "ResourceWarning" in ln or "cleanup step failed" in ln]


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
    line = next(ln for ln in lifecycle_worker.log().splitlines()
                if f"operation failed op={res.id}" in ln)
    assert re.search(r"cleanup op=\S+ repo=- outcome=failed files=5 connections=1 temp=3 "
                     r"processes=1 threads=1 tasks=0 failures=0", line), line
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


def test_thousand_operations_ten_percent_failing(probe_table: None, celery_app: Any,
                                                 db: psycopg.Connection[Any],
                                                 temp_root: Path) -> None:
    """1,000 operations, 10% failing at random points: every child exactly at baseline."""
    worker = start_worker("thousand", concurrency=2, queue="thousand")
    try:
        warm_up(celery_app, worker)
        baseline = fleet_state(worker, temp_root)
        jobs = [send(celery_app, worker, "probe.random_op", seed=s) for s in range(1000)]
        states = [j.get(timeout=300, propagate=False) and j.state for j in jobs]
        expected_failures = sum(random.Random(s).random() < 0.1 for s in range(1000))
        assert states.count("FAILURE") == expected_failures
        assert states.count("SUCCESS") == 1000 - expected_failures
        assert_same(fleet_state(worker, temp_root), baseline)
        assert server_sessions(db) == []
        for state in inside_states(celery_app, worker).values():
            assert state["pool"]["checked_out"] == 0
            assert state["leaks"] == {}, "\n".join(leak_lines(worker))
        assert leak_lines(worker) == []
        ledger = dict(db.execute("SELECT state, count(*) FROM runs WHERE task = 'probe.random_op'"
                                 " GROUP BY state").fetchall())
        assert ledger == {"succeeded": 1000 - expected_failures, "failed": expected_failures}
    finally:
        assert worker.stop() == 0
