"""Outcome counters: one finished operation (task, outcome, wall time, clean or not)."""

from __future__ import annotations

import time

from workers import ledger
from workers.steps.base import Operation, Step


class Stats(Step):
    def before(self, op: Operation) -> None:
        op.began = time.monotonic()

    def after(self, op: Operation) -> None:
        report = op.report
        op.runtime.stats.record(op.task, ledger.state_of(op.error), time.monotonic() - op.began,
                                len(report.failures) if report else 0)
