"""Stats publish: after each operation (its leaks counted), this child's counters go to the
main process (``/metrics``, ``inspect stats``). Not on the shutdown path: the runtime's
stop publishes the child's last word."""

from __future__ import annotations

from workers.steps.base import Operation, Step


class Publish(Step):
    def after(self, op: Operation) -> None:
        if not op.interrupted:
            op.runtime.publish()
