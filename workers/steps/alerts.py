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
        log.error("operation %s op=%s repo=%s error=%s; %s", op.outcome, op.job_id,
                  op.repo or "-", ledger.error_text(error),
                  report.line() if report else "no scope")
