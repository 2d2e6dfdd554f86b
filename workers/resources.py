"""The ResourceManager: one scope per repository operation that releases all it acquired.

Design:
- Every acquisition is an entry in an insertion-ordered registry; ``close()`` releases the
  live entries in reverse order, runs every step even when one fails, and never replaces
  the operation's own exception (cleanup failures are logged and attached as notes).
- Resources the operation closes itself (``with open(...)``, ``proc.wait()``) are pruned
  from the registry lazily, so a 10,000-file operation holds no 10,000 closures and the
  live counts stay exact. This is why the registry is not a bare ``ExitStack``: an
  ExitStack cannot forget an entry that was released early.
- State is explicit (unopened -> open -> closed): closing twice returns the same report,
  acquiring after close raises ``ResourceError``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from workers.errors import ResourceError, Revoked
from workers.kinds import SCOPE_KINDS, State
from workers.processes import has_open_pipes, reap

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

log = logging.getLogger("repoindex.cleanup")
KINDS = SCOPE_KINDS
_current: contextvars.ContextVar[ResourceManager] = contextvars.ContextVar("repoindex_scope")


@dataclass(eq=False)
class _Entry:
    obj: object  # held so that id(obj), the registry key, cannot be reused while tracked
    kind: str
    label: str
    release: Callable[[], None]
    alive: Callable[[], bool]


@dataclass(frozen=True)
class CleanupReport:
    """What one scope acquired and released, and which release steps failed."""

    op_id: str
    repo: str
    outcome: str
    acquired: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    ms: float = 0.0

    def line(self) -> str:
        counts = " ".join(f"{k}={self.acquired.get(k, 0)}" for k in KINDS)
        return (f"cleanup op={self.op_id} repo={self.repo or '-'} outcome={self.outcome} "
                f"{counts} failures={len(self.failures)} ms={self.ms:.1f}")

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "acquired": dict(self.acquired),
                "failures": [list(f) for f in self.failures], "ms": round(self.ms, 2)}


def current() -> ResourceManager:
    """The scope of the operation running in this context."""
    try:
        return _current.get()
    except LookupError:
        raise ResourceError("no resource scope is open: run inside a repoindex task") from None


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "succeeded"
    if isinstance(error, SystemExit | KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, Revoked):
        return "revoked"
    return "failed"


class ResourceManager:
    """Tracks what one operation acquires and releases it all when the scope closes."""

    def __init__(self, op_id: str, *, repo: str = "", pool: ConnectionPool | None = None,
                 temp_root: Path | None = None, grace: float = 3.0,
                 pool_timeout: float | None = None) -> None:
        self.op_id = op_id
        self.repo = repo
        self.state = State.UNOPENED
        self.report: CleanupReport | None = None
        self._pool = pool
        self._pool_timeout = pool_timeout
        self._temp_root = temp_root
        self._temp_area: Path | None = None
        self._grace = grace
        self._entries: dict[int, _Entry] = {}
        self._acquired = dict.fromkeys(KINDS, 0)
        self._prune_at = 64
        self._started = 0.0
        self._token: contextvars.Token[ResourceManager] | None = None

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> ResourceManager:
        if self.state is not State.UNOPENED:
            raise ResourceError(f"scope {self.op_id} is {self.state.value}; open it once")
        self.state = State.OPEN
        self._started = time.perf_counter()
        self._token = _current.set(self)
        return self

    def __enter__(self) -> ResourceManager:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        report = self.close(error=ev)
        if ev is not None:
            for kind, label, text in report.failures:
                ev.add_note(f"cleanup of {kind} {label} failed: {text}")

    def close(self, error: BaseException | None = None) -> CleanupReport:
        """Release every live entry, newest first; safe to call again."""
        if self.report is not None:
            return self.report
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        self.state = State.CLOSED
        failures: list[tuple[str, str, str]] = []
        pending: BaseException | None = None
        for entry in reversed(list(self._entries.values())):
            try:
                entry.release()
            except Exception as exc:  # a failing step must not skip the others
                failures.append((entry.kind, entry.label, repr(exc)))
                log.warning("cleanup step failed op=%s kind=%s what=%s error=%r",
                            self.op_id, entry.kind, entry.label, exc)
            except BaseException as exc:  # SystemExit mid-cleanup: finish, then re-raise
                failures.append((entry.kind, entry.label, repr(exc)))
                pending = pending or exc
        self._entries.clear()
        ms = (time.perf_counter() - self._started) * 1000 if self._started else 0.0
        self.report = CleanupReport(self.op_id, self.repo, outcome_of(error),
                                    dict(self._acquired), failures, ms)
        log.log(logging.WARNING if failures else logging.INFO, "%s", self.report.line(),
                extra={"names_context": True})
        if pending is not None:
            raise pending
        return self.report

    # -- registry --------------------------------------------------------------------
    def track(self, kind: str, obj: object, release: Callable[[], None],
              alive: Callable[[], bool], label: str = "") -> None:
        """Register a resource; ``release`` runs at close unless ``alive()`` is false."""
        try:
            self._require_open(kind)
        except ResourceError:
            release()  # refused: do not let what was already acquired escape the scope
            raise
        if len(self._entries) >= self._prune_at:
            self._prune()
        self._entries[id(obj)] = _Entry(obj, kind, label or repr(obj), release, alive)
        self._acquired[kind] += 1

    def _require_open(self, kind: str) -> None:
        if kind not in self._acquired:
            raise ResourceError(f"unknown resource kind {kind!r}")
        if self.state is not State.OPEN:
            raise ResourceError(f"scope {self.op_id} is {self.state.value}: cannot acquire {kind}")

    def _prune(self) -> None:
        for key in [k for k, e in self._entries.items() if not e.alive()]:
            del self._entries[key]
        self._prune_at = max(64, 2 * len(self._entries))

    def release(self, obj: object) -> None:
        """Release one tracked resource now (it is forgotten either way)."""
        entry = self._entries.pop(id(obj), None)
        if entry is not None:
            entry.release()

    def live(self) -> dict[str, int]:
        """Counts of resources still held, by kind."""
        self._prune()
        counts = dict.fromkeys(KINDS, 0)
        for entry in self._entries.values():
            counts[entry.kind] += 1
        return counts

    # -- files -----------------------------------------------------------------------
    def open_file(self, path: str | os.PathLike[str], mode: str = "r", **kw: Any) -> IO[Any]:
        self._require_open("files")
        fh: IO[Any] = open(path, mode, **kw)  # noqa: SIM115 - released by the scope
        self.track("files", fh, fh.close, lambda: not fh.closed, label=str(path))
        return fh

    # -- database connections --------------------------------------------------------
    def connection(self) -> psycopg.Connection[Any]:
        """Check a connection out of the pool; it goes back rolled back unless committed."""
        if self._pool is None:
            raise ResourceError("this scope has no connection pool")
        pool = self._pool
        self._require_open("connections")
        conn = pool.getconn(timeout=self._pool_timeout)
        returned = [False]

        def give_back() -> None:
            if returned[0]:
                return
            returned[0] = True
            try:
                if not conn.closed and conn.info.transaction_status != 0:  # not IDLE
                    conn.rollback()
            finally:
                pool.putconn(conn)

        self.track("connections", conn, give_back, lambda: not returned[0], label="pool")
        return conn

    # -- temp files ------------------------------------------------------------------
    def temp_area(self) -> Path:
        """This operation's private temp directory, removed when the scope closes."""
        if self._temp_area is None:
            if self._temp_root is None:
                raise ResourceError("this scope has no temp root")
            self._require_open("temp")
            area = self._temp_root / f"{os.getpid()}-{safe_name(self.op_id)}"
            area.mkdir(parents=True, exist_ok=False)
            self.track("temp", area, lambda: shutil.rmtree(area, ignore_errors=False),
                       area.exists, label=str(area))
            self._temp_area = area
        return self._temp_area

    def temp_path(self, name: str) -> Path:
        """A path inside the temp area; whatever is created there is removed at close."""
        path = self.temp_area() / safe_name(name)
        self.track("temp", path, lambda: _remove(path), lambda: os.path.lexists(path),
                   label=str(path))
        return path

    # -- child processes -------------------------------------------------------------
    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a child process; at close it is terminated, then killed, and reaped."""
        self._require_open("processes")
        # Its own process group, so that cleanup stops whatever it spawned as well
        # (git clone runs git-remote-https and index-pack).
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kw)
        self.track("processes", proc, lambda: reap(proc, self._grace),
                   lambda: proc.returncode is None or has_open_pipes(proc),
                   label=f"pid={proc.pid} {args[0]}")
        return proc

    # -- threads ---------------------------------------------------------------------
    def start_thread(self, target: Callable[[threading.Event], None],
                     name: str) -> threading.Thread:
        """Start a thread that must stop when the event it is given is set."""
        self._require_open("threads")
        stop = threading.Event()
        thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)

        def join() -> None:
            stop.set()
            thread.join(self._grace)
            if thread.is_alive():
                raise ResourceError(f"thread {name} did not stop within {self._grace}s")

        self.track("threads", thread, join, thread.is_alive, label=name)
        thread.start()
        return thread


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def safe_name(text: str) -> str:
    """A file-name-safe rendering of an operation id or temp name."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]
    return cleaned.strip(".") or "op"
