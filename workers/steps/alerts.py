"""Alerts: a failed operation goes to Sentry (grouped by task and error type), and every
operation that did not succeed is one ERROR line with its cleanup report."""

from __future__ import annotations

import logging

from workers import alerts, ledger
from workers.steps.base import Operation, Step

log = logging.getLogger("repoindex.task")  # alerts.init keeps this logger out of Sentry


class Alerts(Step):
    def after(self, op: Operation) -> None:
        error = op.error
        if error is None:
            return
        if ledger.state_of(error) == "failed":
            alerts.report_failure(op.task, op.job_id, error)
        report = op.report
        # The line names the job and repository once: in its cleanup report (``cleanup
        # op=... repo=...``), or itself when there is none; the log context is not repeated.
        where = report.line() if report else f"op={op.job_id} repo={op.repo or '-'} no scope"
        log.error("operation %s error=%s; %s", op.outcome, ledger.error_text(error), where,
                  extra={"names_context": True})
