"""Leak sentinel: what the process holds before the operation (outside its ledger row and
scope) against what it holds after the scope closed. Not on the shutdown path, where the
process is going anyway."""

from __future__ import annotations

from workers.steps.base import Operation, Step


class LeakSentinel(Step):
    def before(self, op: Operation) -> None:
        op.runtime.sentinel.before(op.job_id)

    def after(self, op: Operation) -> None:
        if not op.interrupted:
            op.runtime.sentinel.after(op.job_id)
