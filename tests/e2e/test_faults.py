"""Faults under real workers: Redis restarted, PostgreSQL backends terminated mid-run."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery

from tests import gitrepo
from tests.conftest import start_worker
from tests.e2e.support import (
    inside_states,
    leak_lines,
    ledger_states,
    server_sessions,
    wait_until,
)
from workers.devservices import RedisServer


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
