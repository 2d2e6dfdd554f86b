"""100 repository operations in flight at once across a real fleet (issue 7)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.load import concurrent_run, fleet
from devtools.devservices import PostgresServer
from tests import gitrepo
from tests.e2e.support import assert_same, fleet_state, leak_lines

REPLICAS, CHILDREN, POOL_MAX = 4, 25, 1
BUDGET = REPLICAS * CHILDREN * POOL_MAX  # README "Connection budget"


def test_hundred_concurrent_operations_within_the_connection_budget(
        tmp_path: Path, roots: Path, temp_root: Path, celery_app: Any) -> None:
    """4 replicas x 25 children, pools of at most one connection, on a PostgreSQL allowed
    BUDGET + 20 connections: all 100 succeed, no pool timeout, never more server sessions
    than the budget, fds far below the limit, every child back at its baseline."""
    server = PostgresServer(tmp_path, settings={"max_connections": str(BUDGET + 20)}).start()
    try:
        repos = gitrepo.generated_many(roots, f"conc-{uuid.uuid4().hex[:4]}", 100, files=40)
        queue = f"load-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "DATABASE_URL": server.url, "REPOINDEX_DB_POOL_MIN": "0",
               "REPOINDEX_DB_POOL_MAX": str(POOL_MAX), "REPOINDEX_DB_POOL_TIMEOUT": "120"}
        with fleet(env, tmp_path, replicas=REPLICAS, concurrency=CHILDREN,
                   queue=queue) as workers:
            baseline = {w.name: fleet_state(w, temp_root) for w in workers}
            result = concurrent_run(celery_app, workers, queue, server.url, repos)
            assert result["errors"] == []
            assert result["succeeded"] == 100 and result["ledger_rows"] == 100
            assert result["waiting_together"] == 100, result
            assert result["in_flight_at_once"] == 100, result
            assert 0 < result["peak_server_connections"] <= BUDGET, result
            assert result["peak_child_fds"] < result["fd_limit"] // 2, result
            assert result["pool_wait"]["checkouts"] >= 200  # ledger + operation, each
            for worker in workers:
                assert leak_lines(worker) == [], "\n".join(leak_lines(worker))
                assert_same(_without_pool_sockets(fleet_state(worker, temp_root)),
                            _without_pool_sockets(baseline[worker.name]))
        with psycopg.connect(server.url) as conn:
            files = conn.execute("SELECT count(DISTINCT repo_id), count(*) FROM files"
                                 ).fetchone()
            assert files == (100, 100 * len(gitrepo.tracked(repos[0])))
    finally:
        server.stop()


def _without_pool_sockets(state: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """With pool_min 0 a child connects on its first operation and keeps the connection:
    that socket, the result backend's and the event publisher's (with kombu's two pollers)
    are the pool's and Celery's, made once per child, not leaks. The sentinel (inside)
    checked each operation exactly; here, everything else must match."""
    return {pid: {**s, "fds": {fd for fd in s["fds"] if not fd[1].startswith("socket:")
                               and fd[1] != "anon_inode:[eventpoll]"}}
            for pid, s in state.items()}
