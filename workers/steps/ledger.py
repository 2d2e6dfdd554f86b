"""Ledger row: one row per attempt, opened before the scope and closed with the outcome
and the cleanup report, outside the operation's transaction (``workers.ledger``)."""

from __future__ import annotations

import logging

from workers import ledger, recovery
from workers.steps.base import Operation, Step

log = logging.getLogger("repoindex.task")


class LedgerRow(Step):
    required = True  # an operation without its row must not run

    def before(self, op: Operation) -> None:
        rt = op.runtime
        rt.ensure_schema()
        with rt.db.connection() as conn:
            op.run = ledger.start(
                conn, job_id=op.job_id, task=op.task, max_lost=rt.settings.max_lost,
                node=op.node, args=op.args_hash,
                alive=lambda a: recovery.attempt_alive(a, rt.settings.redis_url))
        if op.run.completed is not None:
            log.info("duplicate delivery of %s ignored: attempt %d already succeeded",
                     op.job_id, op.run.attempt)
            op.result, op.done = op.run.completed, True

    def after(self, op: Operation) -> None:
        if op.run is None or op.run.completed is not None:
            return
        try:
            with op.runtime.db.connection() as conn:
                op.superseded = not ledger.finish(conn, op.run, repository=op.repo,
                                                  result=op.result, error=op.error,
                                                  cleanup=op.report)
        except Exception:  # the ledger must never mask the operation's own outcome
            log.exception("could not record the outcome of %s in the run ledger", op.job_id)
