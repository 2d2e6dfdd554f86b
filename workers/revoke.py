"""``revoke(terminate=True)`` that does what it says, in both its forms.

Celery terminates a revoked running job by sending a signal to the child running it, then
marks the job REVOKED and acknowledges its message. Neither form works as is here:

- the default, SIGTERM, is ignored by the children (billiard's ``REMAP_SIGTERM``, which
  the shutdown relies on), so the operation runs on and commits;
- SIGKILL kills the child: the transaction dies with it, but the ledger row stays
  ``running`` for good (the message is acknowledged, so no copy will ever mark it lost).

So the main process answers Celery's ``task_revoked`` signal: for SIGKILL it closes the
job's ``running`` row as ``revoked``; for any other signal it finds the child from that
row's pid (Celery has already dropped the request), writes the job id to the child's revoke
file and sends it SIGUSR2 (a signal nothing else sends a child). The child's
handler raises ``Revoked`` only if that job's body is what it is running, so a signal that
arrives late cannot stop the next job. ``Revoked`` unwinds the scope like shutdown's
``SystemExit`` (rollback, files, processes, temp areas); the ledger row ends ``revoked`` and
the task ends with Celery's ``Ignore``, so REVOKED stays the job's state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from workers.errors import Revoked

log = logging.getLogger("repoindex.revoke")
SIGNAL = signal.SIGUSR2
T = TypeVar("T")
_running: str | None = None  # the job whose body this child is running
_directory: Path | None = None


def _file(directory: Path, pid: int) -> Path:
    return directory / f"revoke-{pid}"


def install(temp_dir: Path) -> None:
    """In a worker child: raise ``Revoked`` in the running body when asked."""
    global _directory
    _directory = temp_dir
    signal.signal(SIGNAL, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _running is None or _directory is None:
        return
    path = _file(_directory, os.getpid())
    try:
        wanted = path.read_text(encoding="utf-8")
    except OSError:
        return
    if wanted == _running:
        with contextlib.suppress(OSError):
            path.unlink()
        raise Revoked(_running)


def guarded(job_id: str, body: Callable[[], T]) -> Callable[[], T]:
    """``body`` marked as the one a revoke of ``job_id`` may stop (only the body: never a
    lifecycle step)."""
    def call() -> T:
        global _running
        _running = job_id
        try:
            return body()
        finally:
            _running = None
    return call


def on_task_revoked(request: Any = None, terminated: bool = False, signum: Any = None,
                    **_: Any) -> None:
    """Main process: Celery has signalled the child of a revoked running job (and already
    forgotten which child: the request is done for it, so the ledger row says)."""
    if not terminated or request is None:
        return
    job_id = str(getattr(request, "id", ""))
    if signum is not None and int(signum) == signal.SIGKILL:
        _close_killed(job_id)
        return
    import psutil

    from workers.settings import process_settings

    settings = process_settings()
    mine = {c.pid for c in psutil.Process().children()}
    pids = [pid for pid in _running_pids(job_id) if pid in mine]
    for pid in pids:
        try:
            settings.temp_dir.mkdir(parents=True, exist_ok=True)
            _file(settings.temp_dir, pid).write_text(job_id, encoding="utf-8")
            os.kill(pid, SIGNAL)
            log.info("revoke: asked child pid=%d to stop job %s", pid, job_id)
        except OSError as exc:
            log.warning("revoke: could not ask child pid=%d to stop %s: %s", pid, job_id, exc)


def _ledger(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One statement on the run ledger from the main process (which holds no pool: a
    revoke is rare), or [] with a warning."""
    from workers import db
    from workers.settings import process_settings

    try:
        with db.connect(process_settings(), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []
    except Exception as exc:  # the revoke itself has happened; the row is bookkeeping
        log.warning("revoke: the run ledger is unreachable (%s)", exc)
        return []


def _running_pids(job_id: str) -> list[int]:
    rows = _ledger("SELECT pid FROM runs WHERE job_id = %s AND state = 'running'"
                   " AND pid IS NOT NULL", (job_id,))
    return [int(r[0]) for r in rows]


def _close_killed(job_id: str) -> None:
    """The child was SIGKILLed: its transaction is gone; close the attempt's row."""
    _ledger("UPDATE runs SET state = 'revoked', finished_at = now(), error = %s"
            " WHERE job_id = %s AND state = 'running'",
            ("revoked while it ran (revoke terminate=True, SIGKILL); its transaction died"
             " with its process", job_id))
