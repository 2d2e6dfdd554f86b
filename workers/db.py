"""The per-process PostgreSQL pool and the schema migrations.

A pool is opened in each prefork child after fork (``worker_process_init``) with
``open(wait=False)``, never in the parent: a pool opened before fork hands the child the
parent's server connections. ``Database`` has explicit, idempotent open/close.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg_pool import ConnectionPool

from workers.errors import PoolTimeout, ResourceError, TransientError
from workers.kinds import State
from workers.settings import Settings

log = logging.getLogger("repoindex.db")
MIGRATIONS = Path(__file__).resolve().parent.parent / "ops" / "migrations"
_MIGRATION_LOCK = 0x7265706F  # "repo": one advisory lock key for all migrators


# SQLSTATEs a later attempt may not meet besides class 08 (connection exception): the server
# shutting down or restarting (57P01-57P03), too many connections (53300), a serialization
# failure or deadlock (40001, 40P01). Everything else, e.g. class 54 (program limit
# exceeded, "index row size exceeds ..."), which psycopg also maps to OperationalError,
# fails the same way again.
TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01"})


def transient(error: BaseException) -> bool:
    """Whether a retry may succeed: our ``TransientError`` (pool timeout), a connection
    exception or one of ``TRANSIENT_SQLSTATES``, or a broken connection (no SQLSTATE)."""
    if isinstance(error, TransientError):
        return True
    if not isinstance(error, psycopg.Error):
        return False
    state = error.sqlstate
    if state is None:
        return isinstance(error, psycopg.OperationalError)
    return state.startswith("08") or state in TRANSIENT_SQLSTATES


def session_options(settings: Settings) -> str:
    """libpq ``options`` giving our sessions a server-side idle-in-transaction backstop,
    and server-side keepalives: a session whose client is cut off ends within about
    ``REPOINDEX_NET_TIMEOUT`` seconds instead of holding its locks for hours."""
    idle, interval, count = _keepalive(settings)
    return (f"-c idle_in_transaction_session_timeout={settings.idle_tx_timeout_ms} "
            f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={interval} "
            f"-c tcp_keepalives_count={count} "
            f"-c tcp_user_timeout={settings.net_timeout * 1000} "
            "-c application_name=repoindex")


def _keepalive(settings: Settings) -> tuple[int, int, int]:
    """(idle, interval, count) seconds of TCP keepalive summing to the net timeout."""
    interval = max(1, settings.net_timeout // 6)
    return settings.net_timeout - 3 * interval, interval, 3


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """libpq parameters of every connection of ours: session options, and client-side
    keepalives and ``tcp_user_timeout`` (a half-open link fails in seconds, not hours)."""
    idle, interval, count = _keepalive(settings)
    return {"options": session_options(settings), "keepalives": 1,
            "keepalives_idle": idle, "keepalives_interval": interval,
            "keepalives_count": count, "tcp_user_timeout": settings.net_timeout * 1000,
            "connect_timeout": min(settings.net_timeout, 10)}


class _Connection(psycopg.Connection[Any]):
    """Remembers why the last connection attempt of its pool failed (the server's words)."""

    last_error: str | None = None

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        try:
            conn = super().connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            cls.last_error = " ".join(str(exc).split())[-300:]
            raise
        cls.last_error = None
        return conn


class _Pool(ConnectionPool[Any]):
    """Counts the connections handed out (``pool_size - pool_available`` also counts the
    ones being made while the server is away, which are nobody's), and turns
    ``PoolTimeout`` into one clear line: how long, how big, what the server said."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.checked_out = 0
        self.on_wait: Callable[[float], None] | None = None  # seconds each checkout waited
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        with self._count_lock:
            self.checked_out -= 1
        conn.returned_at = time.monotonic()  # type: ignore[attr-defined]  # see check_idle
        super().putconn(conn)

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        began = time.monotonic()
        try:
            conn: psycopg.Connection[Any] = super().getconn(timeout)
        except psycopg_pool.PoolTimeout:
            waited = self.timeout if timeout is None else timeout
            reason = getattr(self.connection_class, "last_error", None)
            raise PoolTimeout(
                f"no database connection within {waited:g} s (REPOINDEX_DB_POOL_TIMEOUT;"
                f" at most {self.max_size} per worker child"
                + (f"; the server said: {reason})" if reason else
                   ", all in use)")) from None
        with self._count_lock:
            self.checked_out += 1
        if self.on_wait is not None:
            self.on_wait(time.monotonic() - began)
        return conn


class Database:
    """Owns one ``ConnectionPool`` for this process."""

    def __init__(self, settings: Settings, *, name: str = "repoindex") -> None:
        self.settings = settings
        self.state = State.UNOPENED
        self.pool_sockets: set[str] = set()  # /proc fd targets the pool owns (leak sentinel)
        self._lock = threading.Lock()
        # a class per pool: the last connection error is this pool's own
        connection_class = type("Connection", (_Connection,), {"last_error": None})
        self._pool = _Pool(
            settings.database_url,
            connection_class=connection_class,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=settings.pool_timeout,
            max_lifetime=settings.pool_max_lifetime,
            max_idle=settings.pool_max_idle,
            open=False,
            name=name,
            kwargs=connection_kwargs(settings),
            configure=self._configure,
            check=check_idle,
        )

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{conn.fileno()}")
        except OSError:  # no /proc (not Linux): the sentinel is off there anyway
            return
        with self._lock:
            self.pool_sockets.add(target)

    def observe_waits(self, observer: Callable[[float], None]) -> None:
        """Call ``observer(seconds)`` with the wait of every checkout (metrics)."""
        self._pool.on_wait = observer

    @property
    def pool(self) -> ConnectionPool:
        if self.state is not State.OPEN:
            raise ResourceError(f"database pool is {self.state.value}")
        return self._pool

    def open(self, *, wait: bool = False) -> None:
        """Start the pool; with ``wait=False`` connections are made in the background."""
        if self.state is State.OPEN:
            return
        if self.state is State.CLOSED:
            raise ResourceError("database pool was closed; make a new Database")
        self._pool.open(wait=wait)
        self.state = State.OPEN

    def close(self) -> None:
        """Close the pool (idempotent)."""
        if self.state is State.OPEN:
            self._pool.close(timeout=5.0)
        self.state = State.CLOSED

    def stats(self) -> dict[str, int]:
        """Pool statistics with the keys psycopg omits when zero filled in."""
        raw = self._pool.get_stats() if self.state is State.OPEN else {}
        keys = ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting",
                "requests_num", "requests_errors", "connections_lost", "returns_bad")
        stats = {k: int(raw.get(k, 0)) for k in keys}
        stats["checked_out"] = self._pool.checked_out
        return stats

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A short checkout for bookkeeping outside an operation scope."""
        with self.pool.connection() as conn:
            yield conn


RECENT_SECONDS = 1.0  # a connection returned this recently is taken on its socket's word


def check_idle(conn: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it hands out, without a round trip when it can.

    A connection back in the pool for over ``RECENT_SECONDS`` is asked (``SELECT ''``,
    psycopg_pool's own check): a server restarted or a link cut meanwhile is found here,
    and the pool replaces the connection (or waits for one) instead of handing out a dead
    one. One returned more recently (the next step of the same operation: the ledger row,
    the operation, the ledger row again) is asked only when its socket is readable, i.e.
    the server said something unasked (the FATAL of a terminated backend, then EOF). A
    round trip on every checkout was three per operation, most of the lifecycle's cost; a
    link that died within the last second fails the first statement instead, within
    ``REPOINDEX_NET_TIMEOUT``, and that error is transient (retried).
    """
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    returned = getattr(conn, "returned_at", None)
    if returned is None or time.monotonic() - returned > RECENT_SECONDS:
        ConnectionPool.check_connection(conn)
        return
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


def connect(settings: Settings, **kw: Any) -> psycopg.Connection[Any]:
    """A plain connection (CLI, migrations), with the same session options as the pool."""
    return psycopg.connect(settings.database_url, **{**connection_kwargs(settings), **kw})


def migrate(conn: psycopg.Connection[Any], directory: Path = MIGRATIONS) -> list[str]:
    """Apply numbered ``NNN_name.sql`` files not applied yet; safe when many run at once."""
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
            if path.stem in done:
                continue
            conn.execute(path.read_text(encoding="utf-8"))
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (path.stem,))
            applied_now.append(path.stem)
    if applied_now:
        log.info("schema migrated: %s", ", ".join(applied_now))
    return applied_now
