"""Shutdown and process death with real workers: in-flight operations stop, roll back,
clean up, and their jobs run again exactly once."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from devtools.launcher import WorkerProcess
from tests import gitrepo
from tests.conftest import start_worker
from tests.e2e.support import (
    ledger_states,
    queue_length,
    server_sessions,
    temp_areas,
    unclean_exits,
    wait_until,
)


def our_processes(worker_pids: list[int], roots: Path) -> list[int]:
    """Worker processes still alive, and git processes reading our test repositories."""
    alive = [p for p in worker_pids if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "git" and any(str(roots) in a for a in proc.info["cmdline"] or []):
            alive.append(proc.pid)
    return alive


@pytest.fixture(scope="module")
def big_repos(roots: Path) -> list[Path]:
    return gitrepo.generated_many(roots, "shutdown-big", 3, files=6000)


def in_progress(job: Any) -> bool:
    return job.state == "PROGRESS"


def test_sigterm_with_operations_in_flight(celery_app: Any, db: psycopg.Connection[Any],
                                           roots: Path, temp_root: Path,
                                           big_repos: list[Path]) -> None:
    """SIGTERM with 3 operations in flight: exit 0, everything released, nothing
    half-written, all 3 jobs back on the queue; a second worker runs each exactly once."""
    queue = f"shutdown-{uuid.uuid4().hex[:6]}"
    worker = start_worker("sigterm", concurrency=3, queue=queue)
    names = [f"inflight-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    jobs = [celery_app.send_task("repoindex.index_repository", queue=queue,
                                 kwargs={"source": str(repo), "name": name})
            for repo, name in zip(big_repos, names, strict=True)]
    wait_until(lambda: all(in_progress(j) for j in jobs), 120, "3 operations in progress")
    pids = [worker.pid, *worker.children()]
    started = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.stop(timeout=30) == 0
    elapsed = time.monotonic() - started
    print(f"exit after SIGTERM with 3 operations in flight: {elapsed:.2f}s")
    assert elapsed < 30
    assert our_processes(pids, roots) == []
    # the test's SIGTERM and stop()'s are two: no child may be signalled twice (billiard
    # ends it mid-cleanup; the main process would then sweep what it left, so look)
    assert unclean_exits(worker.log()) == []
    assert not [n for pid, n in temp_areas(temp_root) if pid in pids]
    assert server_sessions(db) == []
    assert db.execute("SELECT count(*) FROM repositories WHERE name = ANY(%s)",
                      (names,)).fetchone() == (0,)
    assert queue_length(queue) == 3
    for job in jobs:
        assert ledger_states(db, job.id) == ["interrupted"]
        assert job.state != "FAILURE"
    second = start_worker("sigterm-after", concurrency=2, queue=queue)
    try:
        results = [j.get(timeout=300) for j in jobs]
    finally:
        assert second.stop() == 0
    for repo, name, result in zip(big_repos, names, results, strict=True):
        assert result["repository"] == name
        assert result["files"] == len(gitrepo.tracked(repo))
    for job in jobs:
        assert ledger_states(db, job.id) == ["interrupted", "succeeded"]
    assert db.execute("SELECT count(*) FROM repositories WHERE name = ANY(%s)",
                      (names,)).fetchone() == (3,)


@pytest.fixture(scope="module")
def thirty_repos(roots: Path) -> list[Path]:
    return gitrepo.generated_many(roots, "replica", 30, files=400)


def test_three_replicas_one_stopped_mid_run(celery_app: Any, db: psycopg.Connection[Any],
                                            thirty_repos: list[Path]) -> None:
    """Three replicas share 30 jobs; one gets SIGTERM mid-run: all 30 complete exactly once."""
    queue = f"replicas-{uuid.uuid4().hex[:6]}"
    replicas = [start_worker(f"replica{i}", concurrency=1, queue=queue) for i in range(3)]
    names = [f"rep-{uuid.uuid4().hex[:6]}-{i}" for i in range(30)]
    try:
        jobs = [celery_app.send_task("repoindex.index_repository", queue=queue,
                                     kwargs={"source": str(repo), "name": name})
                for repo, name in zip(thirty_repos, names, strict=True)]
        wait_until(lambda: sum(j.ready() for j in jobs) >= 5, 120, "5 jobs done")
        os.kill(replicas[0].pid, signal.SIGTERM)
        assert replicas[0].stop(timeout=30) == 0
        results = [j.get(timeout=300) for j in jobs]
    finally:
        for replica in replicas[1:]:
            assert replica.stop() == 0
    assert [r["repository"] for r in results] == names
    for job in jobs:
        states = ledger_states(db, job.id)
        assert states.count("succeeded") == 1, (job.id, states)
        assert set(states) <= {"succeeded", "interrupted"}
    assert db.execute("SELECT count(*) FROM repositories WHERE name = ANY(%s)",
                      (names,)).fetchone() == (30,)


@pytest.fixture
def single(probe_queue: str) -> Iterator[WorkerProcess]:
    worker = start_worker("single", concurrency=1, queue=probe_queue)
    yield worker
    assert worker.stop() == 0


@pytest.fixture
def probe_queue() -> str:
    return f"single-{uuid.uuid4().hex[:6]}"


def test_sigkill_of_a_child_mid_operation(celery_app: Any, db: psycopg.Connection[Any],
                                          temp_root: Path, big_repos: list[Path],
                                          single: WorkerProcess, probe_queue: str) -> None:
    """The job is delivered again and completes once; no partial index survives; the dead
    child's temp area is swept by the child that replaces it."""
    name = f"killed-{uuid.uuid4().hex[:6]}"
    job = celery_app.send_task("repoindex.index_repository", queue=probe_queue,
                               kwargs={"source": str(big_repos[0]), "name": name})
    wait_until(lambda: in_progress(job), 120, "operation in progress")
    [child] = single.children()
    os.kill(child, signal.SIGKILL)
    result = job.get(timeout=300)
    assert result["files"] == len(gitrepo.tracked(big_repos[0]))
    assert ledger_states(db, job.id) == ["lost", "succeeded"]
    assert db.execute("SELECT count(*) FROM repositories WHERE name = %s",
                      (name,)).fetchone() == (1,)
    assert server_sessions(db) == []


def test_job_that_kills_its_child_every_time_is_failed(celery_app: Any,
                                                       db: psycopg.Connection[Any],
                                                       temp_root: Path,
                                                       single: WorkerProcess,
                                                       probe_queue: str) -> None:
    """Each death is recorded; after REPOINDEX_MAX_LOST deaths the job fails with that
    reason; every dead child's temp area is swept by its replacement."""
    job = celery_app.send_task("probe.suicide", queue=probe_queue)
    job.get(timeout=120, propagate=False)
    assert job.state == "FAILURE"
    assert "3 times; not retried" in str(job.result)
    assert ledger_states(db, job.id) == ["lost", "lost", "lost", "failed"]
    assert single.proc is not None and single.proc.poll() is None
    assert single.log().count("swept 1 temp area(s) left by dead worker processes") == 3
    [child] = single.children()
    assert [n for pid, n in temp_areas(temp_root)
            if pid not in (child, single.pid) and not psutil.pid_exists(pid)] == []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "group SIGTERM", "idle SIGTERM"])
def test_every_way_of_stopping_is_safe(celery_app: Any, db: psycopg.Connection[Any],
                                       temp_root: Path, how: str) -> None:
    """SIGINT and a SIGTERM to the whole process group (tini -g, systemd) stop as SIGTERM
    does: exit 0, every cleanup ran (ledger 'interrupted'), every job back on the queue."""
    queue = f"stop-{uuid.uuid4().hex[:6]}"
    worker = start_worker("stop", concurrency=2, queue=queue)
    jobs = [] if how.startswith("idle") else [
        celery_app.send_task("probe.sleep", queue=queue, kwargs={"seconds": 60, "tag": str(i)})
        for i in range(3)]
    # inside their operations: the ledger row is written when the scope opens (STARTED is
    # reported a moment earlier, before the row exists)
    wait_until(lambda: sum(ledger_states(db, j.id) == ["running"] for j in jobs)
               == min(len(jobs), 2), 60, "operations running")
    pids = [worker.pid, *worker.children()]
    started = time.monotonic()
    if how == "SIGINT":
        os.kill(worker.pid, signal.SIGINT)
    elif how == "group SIGTERM":
        os.killpg(worker.pid, signal.SIGTERM)
    else:
        os.kill(worker.pid, signal.SIGTERM)
    assert worker.stop(timeout=30) == 0
    print(f"{how}: exit after {time.monotonic() - started:.2f}s")
    assert [p for p in pids if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    assert unclean_exits(worker.log()) == []
    assert not [n for pid, n in temp_areas(temp_root) if pid in pids]
    assert queue_length(queue) == len(jobs)
    assert sorted(ledger_states(db, j.id) for j in jobs) == \
        [[]] * (len(jobs) - min(len(jobs), 2)) + [["interrupted"]] * min(len(jobs), 2)


def test_second_sigterm_stops_at_once_and_stays_safe(celery_app: Any,
                                                     db: psycopg.Connection[Any],
                                                     temp_root: Path,
                                                     probe_table: None) -> None:
    """A second signal (and stop()'s, a third) during the cold shutdown: no child is
    signalled twice, so each finishes its cleanup (billiard would end one at its second
    terminate signal, os._exit, mid-cleanup); nothing was committed, the jobs are back on
    the queue, and the next worker runs each job once."""
    queue = f"twice-{uuid.uuid4().hex[:6]}"
    worker = start_worker("twice", concurrency=2, queue=queue)
    jobs = [celery_app.send_task("probe.everything", queue=queue,
                                 kwargs={"tag": f"twice{i}", "sleep": 4.0}) for i in range(2)]
    try:
        wait_until(lambda: all(j.state == "STARTED" for j in jobs), 60, "operations started")
    except AssertionError:
        worker.stop()
        raise
    time.sleep(0.5)
    pids = [worker.pid, *worker.children()]
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.stop(timeout=30) == 0
    assert unclean_exits(worker.log()) == []
    assert not [n for pid, n in temp_areas(temp_root) if pid in pids]
    assert db.execute("SELECT count(*) FROM probe_rows WHERE tag LIKE 'twice_'"
                      ).fetchone() == (0,)
    assert queue_length(queue) == 2
    second = start_worker("twice-after", concurrency=2, queue=queue)
    try:
        for job in jobs:
            assert job.get(timeout=120)["live"]["connections"] == 1
    finally:
        assert second.stop() == 0
    assert db.execute("SELECT count(*) FROM probe_rows WHERE tag LIKE 'twice_'"
                      ).fetchone() == (2,)
    assert [ledger_states(db, job.id) for job in jobs] == [["interrupted", "succeeded"]] * 2
    assert not [n for pid, n in temp_areas(temp_root) if not psutil.pid_exists(pid)]


def test_sigterm_while_a_result_is_half_read(celery_app: Any,
                                            db: psycopg.Connection[Any]) -> None:
    """SIGTERM lands after the event loop has read the length of the first job's result
    message from the child's pipe and before its body. Celery ran its cold shutdown right
    there, inside the handler, and that read the same pipe: the loop then resumed at the
    wrong offset (UnpicklingError "invalid load key, '\\x00'", exit 1, the finished job
    restored to the queue, or a hang). Now the shutdown waits for the loop: exit 0, no
    error, the result taken and the job acknowledged."""
    from workers.db import migrate

    migrate(db)
    queue = f"halfread-{uuid.uuid4().hex[:6]}"
    worker = start_worker("halfread", concurrency=1, queue=queue, app="tests.app_signal_timing",
                          env={"REPOINDEX_TEST_SIGNAL_AT": "result:3"})
    assert worker.proc is not None
    job = celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0})
    try:
        assert job.get(timeout=60)["job"] == job.id
        code = worker.proc.wait(30)  # the instrument's SIGTERM stops it
    finally:
        worker.stop()
    log = worker.log()
    assert "signal-timing: SIGTERM after the length of message 3" in log, log[-3000:]
    assert code == 0, log[-3000:]
    assert "CRITICAL" not in log and "Traceback" not in log, log[-3000:]
    assert "Restoring" not in log  # nothing left unacknowledged
    assert queue_length(queue) == 0
    assert ledger_states(db, job.id) == ["succeeded"]


def test_repeated_sigterm_while_operations_are_cancelled(celery_app: Any,
                                                        db: psycopg.Connection[Any],
                                                        temp_root: Path,
                                                        probe_table: None) -> None:
    """A second SIGTERM lands while the cold shutdown is cancelling the running operations.
    Celery's handler for it cancelled them again from inside the first pass, which then
    signalled the children it had not reached yet a second time, and billiard ends a child
    at its second terminate signal (os._exit), mid-cleanup: a temp area left, its ledger row
    still 'running'. Now each child is signalled once and finishes its cleanup, which here
    lasts a second (its thread lingers), so a second signal would land inside it."""
    from workers.db import migrate

    migrate(db)  # the ledger is read before the worker's first operation would apply it
    queue = f"recancel-{uuid.uuid4().hex[:6]}"
    worker = start_worker("recancel", concurrency=3, queue=queue, app="tests.app_signal_timing",
                          env={"REPOINDEX_TEST_SIGNAL_AT": "cancel"})
    jobs = [celery_app.send_task("probe.everything", queue=queue,
                                 kwargs={"tag": f"recancel{i}", "sleep": 60.0, "linger": 1.0})
            for i in range(3)]
    try:
        wait_until(lambda: all(ledger_states(db, j.id) == ["running"] for j in jobs), 60,
                   "3 operations running")
        time.sleep(1.0)  # each holds its files, temp area, git process, thread, transaction
        pids = [worker.pid, *worker.children()]
    finally:
        code = worker.stop(timeout=30)
    log = worker.log()
    assert "signal-timing: second SIGTERM" in log, log[-3000:]
    assert code == 0, log[-3000:]
    assert unclean_exits(log) == []
    assert [ledger_states(db, j.id) for j in jobs] == [["interrupted"]] * 3
    assert not [n for pid, n in temp_areas(temp_root) if pid in pids]
    assert queue_length(queue) == 3
    assert db.execute("SELECT count(*) FROM probe_rows WHERE tag LIKE 'recancel_'"
                      ).fetchone() == (0,)


def test_worker_without_remap_sigterm_warns() -> None:
    """`celery worker` started by hand without REMAP_SIGTERM says what it will cost."""
    worker = start_worker("noremap", concurrency=1, queue=f"noremap-{uuid.uuid4().hex[:6]}",
                          env={"REMAP_SIGTERM": ""})
    try:
        wait_until(lambda: "REMAP_SIGTERM is not SIGQUIT" in worker.log(), 30, "the warning")
    finally:
        assert worker.stop() == 0


def test_sigterm_during_start_up_exits_cleanly(roots: Path) -> None:
    """SIGTERM while the consumer starts (mingle searching for neighbours): exit 0, no
    CRITICAL, no child left, as any other SIGTERM."""
    import subprocess
    import sys

    from tests.conftest import SESSION

    for n in range(3):
        log_path = Path(SESSION["tmp"]) / f"startup-{uuid.uuid4().hex[:6]}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "-c", "1", "-n",
                 f"startup{n}-{uuid.uuid4().hex[:4]}@%h", "-Q", f"startup-{n}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parents[2])
        try:
            wait_until(lambda p=log_path: "mingle: searching" in p.read_text(), 60, "mingle")
            children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = log_path.read_text()
        assert "CRITICAL" not in text and "did_start_ok" not in text, text[-3000:]
        assert our_processes(children, roots) == []


@pytest.mark.parametrize("form", ["SIGTERM", "SIGKILL"])
def test_revoke_terminate_stops_a_running_operation(
        form: str, celery_app: Any, db: psycopg.Connection[Any], roots: Path,
        temp_root: Path) -> None:
    """revoke(terminate=True) with Celery's default signal and with SIGKILL: the running
    operation stops, nothing it wrote is committed, its ledger row ends `revoked`, the
    caller sees REVOKED, its resources are released, and the worker goes on."""
    from workers.db import migrate

    migrate(db)  # the ledger is read before the worker's first operation would apply it
    queue = f"revoke-{uuid.uuid4().hex[:6]}"
    worker = start_worker("revoke", concurrency=1, queue=queue)
    try:
        job = celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 60})
        wait_until(lambda: ledger_states(db, job.id) == ["running"], 60, "the canary running")
        child = worker.children()[0]
        time.sleep(0.5)  # inside its transaction, holding its temp file and git process
        started = time.monotonic()
        celery_app.control.revoke(job.id, terminate=True, signal=form)
        try:
            wait_until(lambda: ledger_states(db, job.id) == ["revoked"], 30, "the row revoked")
        except AssertionError:
            raise AssertionError(f"{ledger_states(db, job.id)}\n{worker.log()[-3000:]}") from None
        print(f"revoke {form}: row revoked after {time.monotonic() - started:.2f}s")
        wait_until(lambda: job.state == "REVOKED", 30, "REVOKED for the caller")
        time.sleep(1.0)  # a commit that was still coming would have landed by now
        assert job.state == "REVOKED"
        assert ledger_states(db, job.id) == ["revoked"]
        assert db.execute("SELECT count(*) FROM canary WHERE job_id = %s",
                          (job.id,)).fetchone() == (0,)
        wait_until(lambda: not [n for pid, n in temp_areas(temp_root) if pid == child], 30,
                   "its temp area removed")
        assert our_processes([], roots) == []
        if form == "SIGTERM":  # stopped cooperatively: the same child goes on
            assert worker.children() == [child]
        after = celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0})
        assert after.get(timeout=60)["job"] == after.id
        assert server_sessions(db) == []
        assert queue_length(queue) == 0
    finally:
        assert worker.stop() == 0
