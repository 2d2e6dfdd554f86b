"""A lifecycle step, the state of one operation the steps share, and the loop that runs
them around a task body.

Rules of the loop: befores in declared order, afters in reverse and only for steps whose
before ran; an after runs whatever the outcome (also on ``SystemExit``, billiard's shutdown
path). A step that fails is logged with its traceback and never masks the operation's
outcome nor skips the other steps; only a ``required`` step failing *before* the body
stops the operation (no ledger row or no scope: it must not run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.resources import CleanupReport, ResourceManager, outcome_of

if TYPE_CHECKING:
    from workers.ledger import Run
    from workers.runtime import Runtime

log = logging.getLogger("repoindex.steps")


@dataclass
class Operation:
    """One call of one task, as the steps see it."""

    task: str
    job_id: str
    runtime: Runtime
    node: str = ""  # the Celery node (name@host) running it
    args_hash: str | None = None  # ledger.args_hash of its task and arguments
    run: Run | None = None
    scope: ResourceManager | None = None
    result: Any = None
    error: BaseException | None = None
    done: bool = False  # a before step already has the result: the body does not run
    superseded: bool = False  # the ledger had judged this attempt lost: a copy answers
    began: float = field(default_factory=time.monotonic)

    @property
    def report(self) -> CleanupReport | None:
        return self.scope.report if self.scope else None

    @property
    def repo(self) -> str:
        return self.scope.repo if self.scope else ""

    @property
    def outcome(self) -> str:
        return outcome_of(self.error)

    @property
    def interrupted(self) -> bool:
        return isinstance(self.error, SystemExit | KeyboardInterrupt)


class Step:
    """One per-operation concern; both halves default to doing nothing."""

    required = False  # a failing before stops the operation (else: logged, after skipped)

    def before(self, op: Operation) -> None:
        return None

    def after(self, op: Operation) -> None:
        return None


def run(steps: Sequence[Step], op: Operation, body: Callable[[], Any],
        failed: Callable[[Exception], BaseException] = lambda exc: exc) -> Any:
    """``body()`` wrapped in ``steps``; returns its result or raises its error, which
    ``failed`` may replace first (a retry), so that every after-step sees the final word."""
    began: list[Step] = []
    try:
        for step in steps:
            try:
                step.before(op)
            except Exception:
                if step.required:
                    raise
                log.exception("lifecycle step %s failed before op=%s; its after is skipped",
                              type(step).__name__, op.job_id)
                continue
            began.append(step)
            if op.done:
                break
        if not op.done:
            op.result = body()
    except Exception as exc:
        op.error = failed(exc)
    except BaseException as exc:
        op.error = exc
    for step in reversed(began):
        try:
            step.after(op)
        except Exception:
            log.exception("lifecycle step %s failed after op=%s; the outcome stands",
                          type(step).__name__, op.job_id)
        except BaseException as exc:  # SystemExit mid-way: the rest see it, then it is raised
            op.error = op.error or exc
    if op.error is not None:
        raise op.error
    return op.result
