"""Resource scope: one ``ResourceManager`` around the task body; closing it releases all the
operation acquired, newest first, and notes cleanup failures on the operation's error."""

from __future__ import annotations

from workers.steps.base import Operation, Step


class ResourceScope(Step):
    required = True  # no scope, no operation

    def before(self, op: Operation) -> None:
        op.scope = op.runtime.scope(op.job_id).open()

    def after(self, op: Operation) -> None:
        if op.scope is not None:
            error = op.error
            op.scope.__exit__(type(error) if error else None, error,
                              error.__traceback__ if error else None)
