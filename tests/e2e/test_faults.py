"""Faults under real workers: Redis restarted, PostgreSQL backends terminated mid-run."""

from __future__ import annotations

import getpass
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from celery import Celery

from devtools.devservices import RedisServer
from tests import gitrepo
from tests.conftest import start_worker
from tests.e2e.support import (
    inside_states,
    leak_lines,
    ledger_states,
    server_sessions,
    wait_until,
)


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, persistent=True).start()
    yield server
    server.stop()


def test_redis_restarted_mid_run(persistent_redis: RedisServer) -> None:
    """Jobs in flight and queued when Redis restarts all complete; the worker reconnects
    and its children show no leak."""
    url = persistent_redis.url
    queue = f"redis-restart-{uuid.uuid4().hex[:6]}"
    worker = start_worker("redis-restart", concurrency=2, queue=queue,
                          env={"REDIS_URL": url, "REPOINDEX_VISIBILITY_TIMEOUT": "5"})
    client = Celery(broker=url, backend=url)
    try:
        jobs = [client.send_task("probe.sleep", queue=queue, kwargs={"seconds": 1.0,
                                                                      "tag": str(i)})
                for i in range(10)]
        wait_until(lambda: sum(j.ready() for j in jobs) >= 2, 60, "2 jobs done")
        persistent_redis.restart()
        results = [j.get(timeout=180) for j in jobs]
        assert sorted(r["tag"] for r in results) == [str(i) for i in range(10)]
        assert worker.proc is not None and worker.proc.poll() is None
        assert leak_lines(worker) == [], "\n".join(leak_lines(worker))
        for state in inside_states(client, worker).values():
            assert state["leaks"] == {} and state["pool"]["checked_out"] == 0
    finally:
        client.close()
        assert worker.stop() == 0


def _shipped_fsync() -> str:
    """The appendfsync that docker-compose.yml and the k8s example run Redis with (the two
    must agree; the test below kills a server running it)."""
    root = Path(__file__).resolve().parents[2]
    found = set()
    for path in (root / "docker-compose.yml", root / "ops/k8s/deployment.yaml"):
        text = path.read_text()
        assert '"--appendonly", "yes"' in text, path
        found.add(text.split('"--appendfsync", "', 1)[1].split('"', 1)[0])
    assert len(found) == 1, found
    return found.pop()


@pytest.fixture
def shipped_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, persistent=True, fsync=_shipped_fsync()).start()
    yield server  # stopped after the test's results are gone (they unsubscribe on delete)
    server.stop()


def test_redis_sigkilled_with_the_shipped_persistence_loses_no_job(
        shipped_redis: RedisServer, db: psycopg.Connection[Any]) -> None:
    """Redis as shipped (AOF, fsync every second) SIGKILLed with jobs queued and in flight,
    then started again on its file: every job completes, exactly once."""
    server = shipped_redis
    url = server.url
    queue = f"redis-kill-{uuid.uuid4().hex[:6]}"
    worker = start_worker("redis-kill", concurrency=2, queue=queue,
                          env={"REDIS_URL": url, "REPOINDEX_VISIBILITY_TIMEOUT": "5"})
    # no result backend here: outcomes are read from the ledger, and no result object is
    # left subscribed to a server this test kills
    client = Celery(broker=url)

    def succeeded() -> int:
        row = db.execute("SELECT count(DISTINCT job_id) FROM runs WHERE job_id = ANY(%s)"
                         " AND state = 'succeeded'", (ids,)).fetchone()
        return int(row[0]) if row else 0

    try:
        ids = [client.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 1.0}).id
               for _ in range(8)]
        wait_until(lambda: succeeded() >= 2, 60, "2 jobs done")
        time.sleep(1.5)  # everysec: what was written a second ago is on disk
        server.kill()
        server.start()
        wait_until(lambda: succeeded() == 8, 180, "all 8 jobs succeeded")
        rows = db.execute("SELECT job_id, count(*) FROM runs WHERE job_id = ANY(%s) AND"
                          " state = 'succeeded' GROUP BY job_id", (ids,)).fetchall()
        assert sorted(n for _, n in rows) == [1] * 8
        assert db.execute("SELECT count(*) FROM canary WHERE job_id = ANY(%s)",
                          (ids,)).fetchone() == (8,)
        assert worker.proc is not None and worker.proc.poll() is None
        assert leak_lines(worker) == [], "\n".join(leak_lines(worker))
    finally:
        client.close()
        assert worker.stop() == 0


def test_postgres_backends_terminated_mid_operation(celery_app: Any,
                                                    db: psycopg.Connection[Any],
                                                    roots: Path) -> None:
    """The operation fails on the lost connection, is retried, and succeeds; the pool
    replaces the dead connections; nothing is left idle in transaction."""
    repo = roots / "pg-terminate"
    gitrepo.generated(repo, files=6000)
    queue = f"pg-{uuid.uuid4().hex[:6]}"
    worker = start_worker("pg-terminate", concurrency=1, queue=queue)
    try:
        job = celery_app.send_task("repoindex.index_repository", queue=queue,
                                   kwargs={"source": str(repo), "name": "pg-terminate"})
        wait_until(lambda: job.state == "PROGRESS", 120, "operation in progress")
        killed = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE"
            " application_name = 'repoindex' AND datname = current_database()").fetchone()
        assert killed is not None and killed[0] >= 1
        result = job.get(timeout=300)
        assert result["files"] == len(gitrepo.tracked(repo))
        assert ledger_states(db, job.id) == ["retried", "succeeded"]
        error = db.execute("SELECT error FROM runs WHERE job_id = %s AND state = 'retried'",
                           (job.id,)).fetchone()
        assert error is not None and error[0].startswith("retrying after:")
        time.sleep(0.5)
        assert server_sessions(db) == []
        assert leak_lines(worker) == [], "\n".join(leak_lines(worker))
        again = celery_app.send_task("repoindex.index_repository", queue=queue,
                                     kwargs={"source": str(repo), "name": "pg-terminate"})
        assert again.get(timeout=120)["read"] == 0
    finally:
        assert worker.stop() == 0
    assert os.path.isdir(repo)


def test_redis_unreachable_at_worker_start(tmp_path: Path) -> None:
    """The worker says it cannot connect and retries; once Redis is there it works."""
    from devtools.devservices import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    queue = f"late-redis-{uuid.uuid4().hex[:6]}"
    worker = start_worker("late-redis", concurrency=1, queue=queue, wait=False,
                          env={"REDIS_URL": url})
    server = None
    try:
        worker.wait_for_log("Cannot connect to redis://", 60)
        assert "Trying again in" in worker.log()
        server = RedisServer(tmp_path, port=port).start()
        worker.wait_for_log(" ready.", 60)
        client = Celery(broker=url, backend=url)
        try:
            job = client.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0})
            assert job.get(timeout=60)["seconds"] < 5
        finally:
            client.close()
    finally:
        try:
            code = worker.stop()
        finally:
            if server is not None:
                server.stop()
    assert code == 0, worker.log()[-4000:]


def _with_login(url: str, login: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{login}@{parts.hostname}:{parts.port or 5432}"))


@pytest.fixture
def limited_role(db: psycopg.Connection[Any]) -> Iterator[str]:
    """A login role allowed ``2`` server connections, with our tables' privileges."""
    from workers.db import migrate

    migrate(db)  # as the owner: a role without CREATE cannot (README: `repoindex migrate`)
    role = f"ri_limited_{uuid.uuid4().hex[:6]}"
    db.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2")
    db.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    db.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    db.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    yield role
    db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
               (role,))
    wait_until(lambda: db.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                  (role,)).fetchone() == (0,), 30, "role's sessions gone")
    db.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
    db.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}")
    db.execute(f"REVOKE ALL ON SCHEMA public FROM {role}")
    db.execute(f"DROP ROLE {role}")


def test_connection_budget_exhausted(limited_role: str, db: psycopg.Connection[Any],
                                     celery_app: Any) -> None:
    """Three children, a server budget of two connections, a 2 s pool timeout: operations
    that cannot get a connection fail with a clear error, none hangs; once the budget is
    raised the pool recovers and every child works."""
    url = _with_login(os.environ["DATABASE_URL"], limited_role)
    queue = f"budget-{uuid.uuid4().hex[:6]}"
    worker = start_worker("budget", concurrency=3, queue=queue,
                          env={"DATABASE_URL": url, "REPOINDEX_DB_POOL_MIN": "1",
                               "REPOINDEX_DB_POOL_MAX": "1", "REPOINDEX_DB_POOL_TIMEOUT": "2"})
    try:
        jobs = [celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0.5})
                for _ in range(9)]
        for job in jobs:
            job.get(timeout=60, propagate=False)
        failed = [str(j.result) for j in jobs if j.state == "FAILURE"]
        assert {j.state for j in jobs} == {"SUCCESS", "FAILURE"}, failed
        assert all(f.startswith("no database connection within 2 s") for f in failed), failed
        assert all("too many connections for role" in f for f in failed), failed
        sessions = db.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                              (limited_role,)).fetchone()
        assert sessions == (2,)
        db.execute(f"ALTER ROLE {limited_role} CONNECTION LIMIT 3")
        wait_until(lambda: db.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                      " usename = %s", (limited_role,)).fetchone() == (3,),
                   30, "the third child's pool connected")
        again = [celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0.3})
                 for _ in range(9)]
        assert all(j.get(timeout=60)["seconds"] < 5 for j in again)
        for state in inside_states(celery_app, worker).values():
            assert state["pool"]["checked_out"] == 0 and state["pool"]["pool_size"] == 1
        assert leak_lines(worker) == [], "\n".join(leak_lines(worker))
    finally:
        assert worker.stop() == 0


def test_pool_timeout_is_retried_until_a_connection_frees_up(
        limited_role: str, db: psycopg.Connection[Any], celery_app: Any, roots: Path) -> None:
    """An index job whose pool checkout times out (the child's one connection was
    terminated and the role's whole budget is held elsewhere) is retried, and succeeds once
    a connection frees up."""
    url = _with_login(os.environ["DATABASE_URL"], limited_role)
    repo = roots / "pool-retry"
    gitrepo.generated(repo, files=30)
    queue = f"pool-retry-{uuid.uuid4().hex[:6]}"
    worker = start_worker("pool-retry", concurrency=1, queue=queue,
                          env={"DATABASE_URL": url, "REPOINDEX_DB_POOL_MIN": "1",
                               "REPOINDEX_DB_POOL_MAX": "1", "REPOINDEX_DB_POOL_TIMEOUT": "2"})

    def role_sessions() -> list[int]:
        return [int(r[0]) for r in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s", (limited_role,))]

    held: list[psycopg.Connection[Any]] = []
    try:
        wait_until(lambda: len(role_sessions()) == 1, 30, "the child's pool connected")
        pool_pid = role_sessions()[0]
        held.append(psycopg.connect(url))  # the budget (2) is full
        db.execute("SELECT pg_terminate_backend(%s)", (pool_pid,))
        wait_until(lambda: pool_pid not in role_sessions(), 30, "the pool's backend gone")
        held.append(psycopg.connect(url))  # and full again: the pool cannot reconnect
        job = celery_app.send_task("repoindex.index_repository", queue=queue,
                                   kwargs={"source": str(repo), "name": "pool-retry"})
        wait_until(lambda: f"{job.id}] retry: Retry in" in worker.log(), 60,
                   "a retry after the pool timeout")
        assert "no database connection within 2 s" in worker.log()
        for conn in held:
            conn.close()  # a connection frees up
        result = job.get(timeout=120)
        assert result["files"] == len(gitrepo.tracked(repo))
        assert ledger_states(db, job.id)[-1] == "succeeded"
        assert leak_lines(worker) == [], "\n".join(leak_lines(worker))
    finally:
        for conn in held:
            conn.close()
        assert worker.stop() == 0


def test_postgres_restarted_mid_run(tmp_path: Path, celery_app: Any, roots: Path) -> None:
    """A throwaway server (never the user's) restarted under a running index: the operation
    is retried and succeeds, the pools reconnect, nothing is left behind."""
    from devtools.devservices import PostgresServer

    server = PostgresServer(tmp_path).start()
    repo = roots / "pg-restart"
    gitrepo.generated(repo, files=6000)
    queue = f"pg-restart-{uuid.uuid4().hex[:6]}"
    worker = None
    try:
        worker = start_worker("pg-restart", concurrency=1, queue=queue,
                              env={"DATABASE_URL": server.url})
        job = celery_app.send_task("repoindex.index_repository", queue=queue,
                                   kwargs={"source": str(repo), "name": "pg-restart"})
        wait_until(lambda: job.state == "PROGRESS", 120, "operation in progress")
        server.restart()
        result = job.get(timeout=300)
        assert result["files"] == len(gitrepo.tracked(repo))
        with psycopg.connect(server.url, autocommit=True) as conn:
            assert ledger_states(conn, job.id)[-1] == "succeeded"
            assert "retried" in ledger_states(conn, job.id)
            assert server_sessions(conn) == []
        assert leak_lines(worker) == [], worker.log()[-8000:]
    finally:
        if worker is not None:
            assert worker.stop() == 0
        server.stop()


def test_credentials_never_reach_logs_or_results(tmp_path: Path, celery_app: Any,
                                                 roots: Path) -> None:
    """A password in DATABASE_URL (trust auth accepts and ignores it) appears nowhere:
    not in the worker's log, a job's error, the ledger or the stats reply."""
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    url = _with_login(os.environ["DATABASE_URL"], f"{getpass.getuser()}:{secret}")
    queue = f"secret-{uuid.uuid4().hex[:6]}"
    worker = start_worker("secret", concurrency=1, queue=queue, env={"DATABASE_URL": url})
    try:
        bad = celery_app.send_task("repoindex.index_repository", queue=queue,
                                   kwargs={"source": f"https://user:{secret}@127.0.0.1:9/x.git"})
        bad.get(timeout=60, propagate=False)
        assert bad.state == "FAILURE" and secret not in str(bad.result)
        assert "user:***@" in str(bad.result)
        stats = celery_app.control.inspect(destination=[worker.node], timeout=5).stats()
        assert stats and secret not in str(stats)
        conf = celery_app.control.inspect(destination=[worker.node], timeout=5).conf()
        assert conf and secret not in str(conf)  # what Flower's config page shows
    finally:
        assert worker.stop() == 0
    assert secret not in worker.log()
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM runs WHERE error LIKE %s",
                            (f"%{secret}%",)).fetchone() == (0,)
