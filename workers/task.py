"""The base class of every repository operation.

``OperationTask.__call__`` is the one place an operation's lifecycle is written down:
ledger row opened, one ResourceManager scope around the task body, ledger row closed with
the outcome and the cleanup report. It is structural (``with``/``finally``) rather than a
pair of signals, so it also holds on the shutdown path, where billiard raises
``SystemExit`` in the child and no ``task_postrun`` is sent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Task

from workers import alerts, ledger, logs, runtime
from workers.errors import RepoindexError
from workers.resources import ResourceManager, outcome_of

log = logging.getLogger("repoindex.task")
Progress = Callable[[int, int], None]


class OperationTask(Task[Any, Any]):
    """Runs the task body inside exactly one resource scope and one ledger row."""

    abstract = True
    typing = False  # arguments are validated by the task body, with clearer errors
    throws = (RepoindexError,)  # expected failures: logged as one line, no traceback
    progress_interval = 0.5

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = runtime.current()
        job_id = self.request.id or f"local-{uuid.uuid4()}"
        with logs.bound(job=job_id):
            run = rt.begin_run(job_id, self.name)
            if run.completed is not None:
                log.info("duplicate delivery of %s ignored: attempt %d already succeeded",
                         job_id, run.attempt)
                return run.completed
            began = time.monotonic()
            scope: ResourceManager | None = None
            result: Any = None
            error: BaseException | None = None
            try:
                scope = rt.scope(job_id)
                with scope:
                    result = self.run(*args, **kwargs)
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                rt.after_operation()
                self._finish(rt, run, scope, result, error)
                rt.stats.record(self.name, ledger.state_of(error), time.monotonic() - began,
                                len(scope.report.failures) if scope and scope.report else 0)

    def _finish(self, rt: runtime.Runtime, run: ledger.Run, scope: ResourceManager | None,
                result: Any, error: BaseException | None) -> None:
        report = scope.report if scope else None
        repo = scope.repo if scope else ""
        if error is not None and ledger.state_of(error) == "failed":
            alerts.report_failure(self.name, run.job_id, error)
        if error is not None:
            log.error("operation %s op=%s repo=%s error=%s; %s", outcome_of(error),
                      run.job_id, repo or "-", ledger.error_text(error),
                      report.line() if report else "no scope")
        try:
            with rt.db.connection() as conn:
                ledger.finish(conn, run, repository=repo, result=result, error=error,
                              cleanup=report)
        except Exception:  # the ledger must never mask the operation's own outcome
            log.exception("could not record the outcome of %s in the run ledger", run.job_id)

    def progress(self) -> Progress:
        """A throttled reporter of (done, total) as the PROGRESS state (Flower, CLI)."""
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - last[0] < self.progress_interval:
                return
            last[0] = now
            if self.request.id and not self.request.is_eager:
                self.update_state(state="PROGRESS", meta={"done": done, "total": total})

        return report
