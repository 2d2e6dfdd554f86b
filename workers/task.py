"""The base class of every repository operation.

``OperationTask.__call__`` runs the task body inside ``STEPS``, the lifecycle of one
operation written down in one place: each step is a module of ``workers/steps`` with a
before/after pair, the befores run in this order, the afters in reverse. It is structural
(a loop with ``try``), not a pair of signals, so it also holds on the shutdown path, where
billiard raises ``SystemExit`` in the child and no ``task_postrun`` is sent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from workers import ledger as ledger_rows
from workers import logs, revoke, runtime
from workers.errors import RepoindexError, Revoked
from workers.steps import alerts, base, ledger, memory, publish, scope, sentinel, stats

log = logging.getLogger("repoindex.task")
Progress = Callable[..., None]  # (done, total, phase=...)

STEPS: tuple[base.Step, ...] = (
    publish.Publish(),          # after all else: this child's counters to the main process
    sentinel.LeakSentinel(),    # snapshot before the ledger row and scope, check after
    ledger.LedgerRow(),         # the attempt's row, closed with outcome and cleanup report
    stats.Stats(),              # outcome, wall time and cleanup of the operation counted
    alerts.Alerts(),            # Sentry and the ERROR line of an operation that failed
    memory.MemoryRelease(),     # memory returned once the scope has closed
    scope.ResourceScope(),      # innermost: one ResourceManager around the body
)


class OperationTask(Task[Any, Any]):
    """Runs the task body inside ``STEPS``: exactly one resource scope and one ledger row."""

    abstract = True
    typing = False  # arguments are validated by the task body, with clearer errors
    throws = (RepoindexError,)  # expected failures: logged as one line, no traceback
    Request = "workers.request:ScrubbedRequest"  # events, inspect and logs: no credentials
    progress_interval = 0.5

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        job_id = self.request.id or f"local-{uuid.uuid4()}"
        with logs.bound(job=job_id):
            op = base.Operation(self.name, job_id, runtime.current(),
                                node=self.request.hostname or "",
                                args_hash=ledger_rows.args_hash(self.name, args, kwargs))
            body = revoke.guarded(job_id, lambda: self.run(*args, **kwargs))
            try:
                return base.run(STEPS, op, body, self.failed)
            except Revoked:
                # Celery has stored REVOKED and acknowledged the message: store nothing
                raise Ignore() from None
            except Exception:
                if op.superseded:  # judged lost (fenced): the copy that ran again answers;
                    raise Ignore() from None  # a FAILURE here could reach the caller first
                raise

    def failed(self, error: Exception) -> BaseException:
        """What the lifecycle records for ``error`` (``RetryingOperation``: a retry)."""
        return error

    def progress(self) -> Progress:
        """A throttled reporter of (done, total) in a named phase: the PROGRESS state (its
        meta ``{"phase", "done", "total"}``, for ``repoindex status`` and callers), a
        ``task-progress`` event (Flower shows the state and, as the task's result until it
        has one, ``"<phase>: done/total"``) and one log line when a phase begins."""
        last_at, last_phase, broken = [0.0], [""], [False]

        def report(done: int, total: int, phase: str = "reading blobs") -> None:
            if broken[0]:
                return
            now = time.monotonic()
            begins = phase != last_phase[0]
            if not begins and done < total and now - last_at[0] < self.progress_interval:
                return
            last_at[0], last_phase[0] = now, phase
            if begins:
                log.info("phase: %s (%d/%d)", phase, done, total)
            if self.request.id and not self.request.is_eager:
                meta = {"phase": phase, "done": done, "total": total}
                # best effort: with Redis unreachable (a partition) the operation goes on
                # and commits; its later reports are skipped, not each a socket timeout
                try:
                    # not update_state: it retries for minutes (result_backend_always_retry)
                    backend = self.backend
                    backend._store_result(  # type: ignore[attr-defined]
                        self.request.id, backend.encode_result(meta, "PROGRESS"), "PROGRESS",
                        request=self.request)
                    self.send_event("task-progress", result=f"{phase}: {done}/{total}",
                                    phase=phase, done=done, total=total)
                except Exception as exc:
                    broken[0] = True
                    log.warning("progress not reported (%s: %s); the operation goes on"
                                " without reports", type(exc).__name__, exc)

        return report
