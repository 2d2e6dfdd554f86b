"""Sentry: task errors (Celery integration) and leak warnings, one issue per leak kind.

Initialised in each process that runs operations (after fork) and in the main process;
a no-op without ``SENTRY_DSN``. Events are scrubbed of credentials before they leave.
"""

from __future__ import annotations

from typing import Any

import sentry_sdk

from workers.scrub import scrub
from workers.sentinel import Leak


def _scrub_event(event: Any, hint: Any) -> Any:
    for exc in (event.get("exception") or {}).get("values") or []:
        if isinstance(exc.get("value"), str):
            exc["value"] = scrub(exc["value"])
    if isinstance(event.get("message"), str):
        event["message"] = scrub(event["message"])
    return event


def init(dsn: str, **options: Any) -> bool:
    """Start Sentry when ``dsn`` is set; returns whether it is on."""
    if not dsn:
        return False
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import ignore_logger

    sentry_sdk.init(dsn=dsn, integrations=[CeleryIntegration()],
                    before_send=_scrub_event, **options)
    ignore_logger("repoindex.task")  # its failure lines are sent by report_failure instead
    return True


def report_failure(task: str, job_id: str, error: BaseException) -> None:
    """A failed operation, grouped by task and error type (not by job or message)."""
    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["repoindex-task-failed", task, type(error).__name__]
        scope.set_tag("task", task)
        scope.set_tag("job", job_id)
        sentry_sdk.capture_exception(error)


def report_leak(leak: Leak, op_id: str) -> None:
    """A warning event fingerprinted by kind, so one kind of leak is one Sentry issue."""
    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["repoindex-leak", leak.kind]
        scope.set_tag("leak_kind", leak.kind)
        scope.set_tag("op", op_id)
        sentry_sdk.capture_message(f"leak kind={leak.kind} {leak.detail}", level="warning")


def report_child_died(worker: str, pid: int) -> None:
    """From the main process: a child ended without shutting down (SIGKILL, OOM, crash)."""
    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["repoindex-child-died"]
        scope.set_tag("worker", worker)
        sentry_sdk.capture_message(f"worker child pid={pid} of {worker} died without shutting"
                                   " down (killed or crashed)", level="error")


def report_memory(text: str) -> None:
    """A suspected memory leak as one Sentry issue per worker host."""
    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["repoindex-memory-leak"]
        sentry_sdk.capture_message(text, level="warning")
