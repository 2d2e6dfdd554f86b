"""The per-process runtime pieces in-process: temp sweep, ledger attempts, sentinel,
pool state, the launcher's error paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.launcher import WorkerProcess
from workers import ledger, runtime
from workers.db import Database, migrate
from workers.errors import ConfigError, LimitExceeded, ResourceError
from workers.sentinel import Leak, Sentinel
from workers.settings import Settings


def test_sweep_removes_only_areas_of_dead_processes(tmp_path: Path) -> None:
    """Areas of dead pids go; so does an operation area of our own pid (an earlier process
    of that pid left it); a stats directory of our own pid is the worker's own, in use (a
    main process sweeping it logged a false warning at every start and lost its
    children's figures)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name in (f"{dead.pid}-job", f"{os.getppid()}-job", "notapid-x", f"{os.getpid()}-old",
                 f"stats-{dead.pid}", f"stats-{os.getppid()}", f"stats-{os.getpid()}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    removed = runtime.sweep_temp(tmp_path)
    assert sorted(removed) == sorted([f"{dead.pid}-job", f"{os.getpid()}-old",
                                      f"stats-{dead.pid}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{os.getppid()}-job",
                                                                 "notapid-x",
                                                                 f"stats-{os.getppid()}",
                                                                 f"stats-{os.getpid()}"])
    assert runtime.sweep_temp(tmp_path / "missing") == []


def test_sweep_of_given_pids_removes_only_their_dead_areas(tmp_path: Path) -> None:
    """What a main process sweeps once its pool is joined: the operation areas of its own
    children that are dead; not another dead process's, not a live one's, no stats."""
    mine, other = (subprocess.Popen(["true"]) for _ in range(2))
    mine.wait()
    other.wait()
    live = os.getppid()
    for name in (f"{mine.pid}-job", f"{other.pid}-job", f"{live}-job", f"stats-{mine.pid}"):
        (tmp_path / name).mkdir()
    removed = runtime.sweep_temp(tmp_path, pids={mine.pid, live}, why="test")
    assert removed == [f"{mine.pid}-job"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{other.pid}-job", f"{live}-job", f"stats-{mine.pid}"])


def test_redis_endpoints() -> None:
    found = runtime.redis_endpoints("redis://127.0.0.1:6390/0", "redis+socket:///tmp/x.sock",
                                    "redis://no-such-host.invalid:1/0")
    assert found == frozenset({("127.0.0.1", 6390)})


def test_ledger_marks_lost_attempts_and_gives_up(db: psycopg.Connection[Any]) -> None:
    """A job whose previous attempts are still 'running' died with its process; after
    max_lost such deaths it is failed, not run again."""
    migrate(db)
    job = f"lost-{os.getpid()}"
    def dead(_: ledger.Attempt) -> bool:
        return False

    attempts = [ledger.start(db, job_id=job, task="t", max_lost=2, alive=dead)
                for _ in range(2)]
    assert [a.attempt for a in attempts] == [1, 2]
    with pytest.raises(LimitExceeded, match=r"died during the operation.*2 times; not retried"):
        ledger.start(db, job_id=job, task="t", max_lost=2, alive=dead)
    states = db.execute("SELECT state FROM runs WHERE job_id = %s ORDER BY id", (job,)).fetchall()
    assert [s[0] for s in states] == ["lost", "lost", "failed"]


def test_ledger_waits_for_a_live_copy_and_takes_its_outcome(db: psycopg.Connection[Any]) -> None:
    """A second copy of a job whose attempt is alive does not run: it waits, then returns
    the first copy's result (succeeded) or raises its error (failed)."""
    migrate(db)
    for outcome in ("succeeded", "failed"):
        job = f"copy-{outcome}-{os.getpid()}"
        first = ledger.start(db, job_id=job, task="t", max_lost=3)
        # this process is alive: by default (same host, pid alive) the attempt is live
        assert ledger.same_host_alive(ledger.Attempt(
            socket.gethostname(), os.getpid(), None, 0.0)) is True

        def finish(job: str = job, outcome: str = outcome, run: ledger.Run = first) -> None:
            time.sleep(0.6)
            with psycopg.connect(db.info.dsn) as other:
                ledger.finish(other, run, repository="r", result={"n": 1},
                              error=None if outcome == "succeeded" else ValueError("boom"),
                              cleanup=None)

        thread = threading.Thread(target=finish)
        thread.start()
        began = time.monotonic()
        try:
            if outcome == "succeeded":
                second = ledger.start(db, job_id=job, task="t", max_lost=3)
                assert (second.attempt, second.completed) == (1, {"n": 1})
            else:
                with pytest.raises(ledger.AlreadyFailed, match="ValueError: boom"):
                    ledger.start(db, job_id=job, task="t", max_lost=3)
        finally:
            thread.join()
        assert time.monotonic() - began >= 0.5  # it waited for the first copy
        rows = db.execute("SELECT state FROM runs WHERE job_id = %s", (job,)).fetchall()
        assert rows == [(outcome,)]
    # a pid that is not alive on this host is dead; another host's attempt is not ours to say
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert ledger.same_host_alive(ledger.Attempt(socket.gethostname(), gone.pid, None, 0)) \
        is False
    assert ledger.same_host_alive(ledger.Attempt("elsewhere", 1, "w@elsewhere", 0)) is None


def test_sentinel_reports_every_kind(tmp_path: Path) -> None:
    """Working fakes for the pool count; real fds, threads, processes and temp entries."""
    checked_out = [0]
    reported: list[tuple[Leak, str]] = []
    sentinel = Sentinel(temp_root=tmp_path, checked_out=lambda: checked_out[0],
                        exempt_sockets=set, report=lambda leak, op: reported.append((leak, op)))
    assert sentinel.after("never-started") == []
    sentinel.before("op")
    fh = open(tmp_path / "leaked.txt", "w")  # noqa: SIM115 - the leak under test
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="leaky")
    thread.start()
    proc = subprocess.Popen(["sleep", "30"])
    (tmp_path / f"{os.getpid()}-op").mkdir()
    checked_out[0] = 1
    try:
        kinds = sorted(leak.kind for leak in sentinel.after("op"))
    finally:
        fh.close()
        stop.set()
        thread.join()
        proc.kill()
        proc.wait()
    assert kinds == ["connection", "fd", "process", "temp", "thread"]
    assert {op for _, op in reported} == {"op"}
    assert dict(sentinel.counts) == dict.fromkeys(kinds, 1)


def test_database_state_machine() -> None:
    db = Database(Settings.from_env())
    with pytest.raises(ResourceError, match="pool is unopened"):
        _ = db.pool
    db.open(wait=True)
    db.open()  # idempotent
    assert db.pool_sockets  # the configure callback saw the pool's connection
    db.close()
    db.close()
    with pytest.raises(ResourceError, match="was closed"):
        db.open()


def test_runtime_start_current_shutdown() -> None:
    """Outside a prefork child the runtime starts on first use and shuts down cleanly."""
    rt = runtime.current()
    assert runtime.current() is rt
    rt.ensure_schema()
    runtime.shutdown()
    runtime.shutdown()
    assert rt.db.state.value == "closed"


def test_launcher_reports_a_worker_that_cannot_start(tmp_path: Path) -> None:
    proc = WorkerProcess(dict(os.environ), name="broken", log_path=tmp_path / "log",
                         app="no_such_module_xyz")
    with pytest.raises(ConfigError, match="worker broken exited"):
        proc.start(ready_timeout=60)
    assert proc.stop() != 0
    assert proc.children() == []


def test_launcher_timeout_and_kill(tmp_path: Path) -> None:
    """A process that never logs 'ready' and ignores SIGTERM is killed by stop()."""
    proc = WorkerProcess(dict(os.environ), name="stubborn", log_path=tmp_path / "log")
    proc.argv = [sys.executable, "-c",
                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                 "print('up', flush=True); time.sleep(60)"]
    with pytest.raises(ConfigError, match="not logged within"):
        proc.start(ready_timeout=1)
    assert proc.stop(timeout=0.5) == -9


def test_ledger_hands_back_the_result_of_a_job_that_already_succeeded(
        db: psycopg.Connection[Any]) -> None:
    """A message redelivered after its operation committed (the ack was lost to a
    shutdown) is not run again: the earlier attempt's result is handed back."""
    migrate(db)
    job = f"done-{os.getpid()}"
    first = ledger.start(db, job_id=job, task="t", max_lost=3)
    assert first.completed is None
    ledger.finish(db, first, repository="r", result={"files": 7}, error=None, cleanup=None)
    again = ledger.start(db, job_id=job, task="t", max_lost=3)
    assert (again.id, again.attempt, again.completed) == (first.id, 1, {"files": 7})
    states = db.execute("SELECT state FROM runs WHERE job_id = %s", (job,)).fetchall()
    assert states == [("succeeded",)]


def test_an_attempt_elsewhere_is_alive_while_its_replica_lease_lists_it(
        redis_server: Any) -> None:
    from workers import recovery

    url = os.environ["REDIS_URL"]
    node = f"w-{os.getpid()}@elsewhere"
    client = recovery.client_for(url)
    try:
        renewed = time.time()
        client.set(recovery.lease_key(node), json.dumps({"pid": 1, "pids": [123],
                                                          "at": renewed}), px=10_000)

        def attempt(pid: int, started: float) -> ledger.Attempt:
            return ledger.Attempt("elsewhere", pid, node, started)

        assert recovery.attempt_alive(attempt(123, renewed - 5), url) is True
        # a child too new to be listed yet: alive until the next renewal says otherwise
        assert recovery.attempt_alive(attempt(999, renewed + 1), url) is True
        # not listed by a renewal after it began: its process is gone
        assert recovery.attempt_alive(attempt(999, renewed - 1), url) is False
        client.delete(recovery.lease_key(node))
        assert recovery.attempt_alive(attempt(123, renewed - 5), url) is False  # replica gone
        assert recovery.attempt_alive(ledger.Attempt("elsewhere", 5, None, 0), url) is False
    finally:
        client.close()


def test_sessions_fail_fast_on_a_half_open_link(db: psycopg.Connection[Any]) -> None:
    """Both ends of our PostgreSQL sessions give up on a dead peer after the net timeout:
    the server's keepalives and tcp_user_timeout (set per session), libpq's on the client."""
    from workers import db as workers_db

    settings = Settings.from_env({"DATABASE_URL": db.info.dsn, "REPOINDEX_NET_TIMEOUT": "30"})
    with workers_db.connect(settings) as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                 for name in ("tcp_keepalives_idle", "tcp_keepalives_interval",
                              "tcp_keepalives_count", "tcp_user_timeout")}
        app_name = conn.execute("SHOW application_name").fetchone()
        assert conn.info.host  # over TCP, where keepalives apply
    # 15 s idle + 3 probes 5 s apart = the 30 s net timeout (milliseconds for the last)
    assert shown == {"tcp_keepalives_idle": "15", "tcp_keepalives_interval": "5",
                     "tcp_keepalives_count": "3", "tcp_user_timeout": "30000"}, shown
    assert app_name == ("repoindex",)
    kwargs = workers_db.connection_kwargs(settings)
    assert (kwargs["keepalives"], kwargs["tcp_user_timeout"]) == (1, 30_000)


def test_pool_check_asks_the_server_only_when_it_spoke(db: psycopg.Connection[Any]) -> None:
    """A checkout of a connection returned within RECENT_SECONDS costs no round trip (the
    server's record of its last statement is unchanged); one back in the pool longer is
    asked; a recent one whose backend was terminated is found out and replaced before it
    is handed out, so the caller's first statement works."""
    from workers.db import RECENT_SECONDS, check_idle

    pool = Database(Settings.from_env({"DATABASE_URL": db.info.dsn,
                                       "REPOINDEX_DB_POOL_MIN": "1",
                                       "REPOINDEX_DB_POOL_MAX": "1"}))
    pool.open(wait=True)
    try:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            conn.execute("SELECT 'marker-statement'")
        last = "SELECT query, query_start FROM pg_stat_activity WHERE pid = %s"
        before = db.execute(last, (pid,)).fetchone()
        assert before is not None and before[0] == "COMMIT"  # of the marker's transaction
        for _ in range(3):
            with pool.connection() as conn:
                assert conn.info.backend_pid == pid
        assert db.execute(last, (pid,)).fetchone() == before
        time.sleep(RECENT_SECONDS + 0.1)  # back in the pool a while: it is asked
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid
        asked = db.execute(last, (pid,)).fetchone()
        assert asked is not None and asked[0] == "" and asked[1] > before[1]

        with pool.connection() as conn:
            pass  # returned just now again
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)  # the FATAL and the EOF reach the idle socket
        with pool.connection() as conn:
            assert conn.info.backend_pid != pid
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()
    with psycopg.connect(db.info.dsn) as closed:
        pass
    with pytest.raises(psycopg.OperationalError, match="closed"):
        check_idle(closed)


def test_fence_refuses_a_lost_attempt_and_work_older_than_the_stored_index(
        db: psycopg.Connection[Any]) -> None:
    """In the operation's transaction: an attempt marked lost meanwhile (its replica judged
    gone) may not commit; nor may one that started before the job whose index is stored,
    at another commit. The same commit, or stored work that started earlier, passes."""
    migrate(db)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    repo = f"fenced-{tag}"

    def fence(commit: str) -> None:
        with psycopg.connect(db.info.dsn) as conn, conn.transaction():
            ledger.fence(conn, repository=repo, commit=commit)

    run = ledger.start(db, job_id=f"j-{tag}", task="t", max_lost=3)
    fence("c1")  # no stored index yet
    db.execute("INSERT INTO runs (job_id, task, attempt, state, started_at) VALUES"
               " (%s, 't', 1, 'succeeded', now() + interval '1 second')", (f"k-{tag}",))
    db.execute("INSERT INTO repositories (name, source, ref, commit, last_job_id) VALUES"
               " (%s, 's', 'HEAD', 'c2', %s)", (repo, f"k-{tag}"))
    with pytest.raises(ledger.Superseded, match=f"job k-{tag}, which started after this"
                       " one, indexed it at c2; this job's index at c1 is rolled back"):
        fence("c1")
    fence("c2")  # the same commit: nothing stale to write
    db.execute("UPDATE runs SET started_at = now() - interval '1 hour' WHERE job_id = %s",
               (f"k-{tag}",))
    fence("c1")  # the stored index is older work: this one may replace it
    db.execute("UPDATE runs SET state = 'lost' WHERE id = %s", (run.id,))
    with pytest.raises(ledger.Superseded, match=f"attempt 1 of job j-{tag} is 'lost'"):
        fence("c2")
    assert ledger.finish(db, run, repository=repo, result=None, error=None,
                         cleanup=None) is False
    fence("c1")  # finished: no current attempt, nothing to fence (the indexer used alone)
