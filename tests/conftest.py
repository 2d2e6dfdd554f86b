"""Real services for the whole session, a real worker fixture, and a leak guard.

Redis: a private redis-server (tests restart it); PostgreSQL: DATABASE_URL's server, else
the local default, else a throwaway cluster; in both cases a database of our own that is
dropped at the end. Services start in ``pytest_configure`` so that the environment is in
place before any test module imports ``workers.app``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import devservices
from devtools.launcher import WorkerProcess
from workers.sentinel import open_fds

_stack = contextlib.ExitStack()
SESSION: dict[str, Any] = {}
TEST_ENV = {
    "REPOINDEX_MAX_FILE_BYTES": "65536",
    "REPOINDEX_LOG_LEVEL": "INFO",
    "REPOINDEX_DB_POOL_TIMEOUT": "10",
    # The sampler reads /proc in its own thread; its fds, open for a moment, would show in
    # the tests' exact per-child fd comparisons made from outside. One sample at start.
    "REPOINDEX_SAMPLE_SECONDS": "3600",
    # Workers serve /metrics only where a test asks for it (on a free port).
    "REPOINDEX_METRICS_PORT": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:  # pragma: no cover
        raise pytest.UsageError("run the suite in one process")
    tmp = Path(tempfile.mkdtemp(prefix="repoindex-tests-"))
    _stack.callback(_rmtree, tmp)
    name = f"repoindex_test_{uuid.uuid4().hex[:10]}"
    endpoints = _stack.enter_context(devservices.services(name, private_redis=True, drop=True,
                                                         own_database=True))
    (tmp / "roots").mkdir()
    env = {"REDIS_URL": endpoints.redis_url, "DATABASE_URL": endpoints.database_url,
           "REPOINDEX_ROOTS": str(tmp / "roots"), "REPOINDEX_TEMP_DIR": str(tmp / "work"),
           **TEST_ENV}
    # Whatever else the environment names is not ours either: the result backend would
    # default to the user's REPOINDEX_RESULT_BACKEND, errors would go to the user's Sentry.
    for key in ("REPOINDEX_RESULT_BACKEND", "SENTRY_DSN"):
        os.environ.pop(key, None)
    os.environ.update(env)
    SESSION.update(tmp=tmp, endpoints=endpoints, env=env)


def pytest_unconfigure(config: pytest.Config) -> None:
    import gc

    gc.collect()  # AsyncResults unsubscribe from Redis when collected: while it still runs
    _stack.close()


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def session_env() -> dict[str, str]:
    return dict(SESSION["env"])


@pytest.fixture(scope="session")
def roots() -> Path:
    return Path(SESSION["tmp"]) / "roots"


@pytest.fixture(scope="session")
def temp_root() -> Path:
    return Path(SESSION["tmp"]) / "work"


@pytest.fixture(scope="session")
def redis_server() -> devservices.RedisServer:
    server = SESSION["endpoints"].redis_server
    assert server is not None
    return server  # type: ignore[no-any-return]


@pytest.fixture
def db() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def probe_table() -> None:
    """The table probe.everything writes to (inside the operation's transaction)."""
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS probe_rows (tag text)")


@pytest.fixture(scope="session")
def celery_app() -> Any:
    from workers.app import app

    return app


def start_worker(name: str, *, concurrency: int = 2, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), queue: str | None = None,
                 wait: bool = True, app: str = "tests.app") -> WorkerProcess:
    """A real ``celery worker`` running the product app plus the probe tasks (``app``: a
    module of tests/ that adds to them); with ``queue`` it consumes only that queue, so no
    other test's worker takes its jobs."""
    unique = f"{name}-{uuid.uuid4().hex[:6]}"
    log = Path(SESSION["tmp"]) / f"{unique}.log"
    full_env = {**os.environ, **(env or {})}
    return WorkerProcess(full_env, name=unique, log_path=log, concurrency=concurrency,
                         app=app, args=args, queue=queue).start(wait=wait)


@pytest.fixture(scope="session")
def worker(celery_app: Any, probe_table: None, temp_root: Path) -> Iterator[WorkerProcess]:
    """One long-lived worker (2 prefork children, Celery's default queue) shared by the
    functional tests. After the whole suite its children must be exactly where they were
    after warm-up: same fds, threads, child processes and temp areas, no connection
    checked out, no leak reported."""
    from tests.e2e.support import assert_same, fleet_state, inside_states, leak_lines, warm_up

    proc = start_worker("shared", queue="celery")
    try:
        warm_up(celery_app, proc)
        before = _comparable(fleet_state(proc, temp_root), inside_states(celery_app, proc))
        yield proc
        inside = inside_states(celery_app, proc)
        for state in inside.values():
            assert state["leaks"] == {} and state["pool"]["checked_out"] == 0, state
        assert_same(_comparable(fleet_state(proc, temp_root), inside), before)
        assert leak_lines(proc) == [], "\n".join(leak_lines(proc))
    finally:
        assert proc.stop() == 0


def _comparable(outside: dict[int, dict[str, Any]],
                inside: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A child's state with its sockets as one count net of its pool's connections: other
    tests terminate server sessions (the pool replaces them: new socket inodes) and a
    pool may grow to its max between operations; neither is a leak."""
    out = {}
    for pid, state in outside.items():
        sockets = {fd for fd in state["fds"] if fd[1].startswith("socket:")}
        out[pid] = {**state, "fds": state["fds"] - sockets,
                    "sockets_beyond_pool": len(sockets) - inside[pid]["pool"]["pool_size"]}
    return out


def run(app: Any, task: str, timeout: float = 120, queue: str | None = None,
        **kwargs: Any) -> Any:
    """Send ``task`` by name and wait; returns the AsyncResult (not raising on failure)."""
    result = app.send_task(task, kwargs=kwargs, queue=queue)
    result.get(timeout=timeout, propagate=False)
    return result


@pytest.fixture(autouse=True)
def leak_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test leaves no fds, threads or temp areas behind in the test process."""
    fds_before = {t for _, t in open_fds() if not t.startswith(("socket:", "anon_inode:"))}
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    fds_after = {t for _, t in open_fds() if not t.startswith(("socket:", "anon_inode:"))}
    new_threads = [t.name for t in threading.enumerate()
                   if t.ident not in threads_before and t.is_alive()]
    leaked = sorted(fds_after - fds_before - {"/dev/null"})
    assert not leaked, f"test leaked fds: {leaked}"
    assert not new_threads, f"test leaked threads: {new_threads}"
