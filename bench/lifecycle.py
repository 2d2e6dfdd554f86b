"""``bench lifecycle``: the same operation with the lifecycle machinery (every step of
``OperationTask.__call__``: ledger rows, scope report, sentinel snapshots, memory release,
stats) on and off, alternated, in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import make_repo, workspace
from workers.settings import Settings
from workers.steps.base import Operation, Step


class _Timed(Step):
    """A lifecycle step with a stopwatch on each half (where the overhead goes)."""

    def __init__(self, step: Step, seconds: dict[str, list[float]]) -> None:
        self.step, self.seconds, self.required = step, seconds, step.required
        self.name = type(step).__name__

    def _time(self, half: str, op: Operation) -> None:
        began = time.perf_counter()
        try:
            getattr(self.step, half)(op)
        finally:
            self.seconds.setdefault(f"{self.name}.{half}", []).append(
                time.perf_counter() - began)

    def before(self, op: Operation) -> None:
        self._time("before", op)

    def after(self, op: Operation) -> None:
        self._time("after", op)


def bench_lifecycle(files: int, runs: int, echo: Callable[[str], None],
                    steps: bool = False) -> dict[str, Any]:
    """``steps``: also time each step's before and after (in a second pass of ``runs``
    operations, so that the stopwatches do not weigh on the on/off figures)."""
    from tasks import jobs
    from workers import runtime, task

    with workspace() as ws:
        repo = make_repo(ws.tmp / "repo", files)
        runtime.shutdown()  # a runtime made before this workspace would be stale
        rt = runtime.start(Settings.from_env(ws.env))
        try:
            def on() -> float:
                # Our machinery exactly: OperationTask.__call__ and its steps. Celery's own
                # tracer is left out of both sides.
                started = time.perf_counter()
                jobs.index_repository(source=str(repo), name="lc")
                return time.perf_counter() - started

            def off() -> float:
                # The same task body (validation included) in a bare scope: no ledger rows,
                # no sentinel, no memory release, no cleanup report.
                started = time.perf_counter()
                with rt.scope("off"):
                    jobs.index_repository.run(source=str(repo), name="lc")
                return time.perf_counter() - started

            on(), off()  # warm-up: schema, pool, first index
            samples: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(runs):
                for name, fn in (("on", on), ("off", off)) if i % 2 else (("off", off),
                                                                          ("on", on)):
                    samples[name].append(fn())
            per_step: dict[str, list[float]] = {}
            if steps:
                plain = task.STEPS
                task.STEPS = tuple(_Timed(step, per_step) for step in plain)
                try:
                    for _ in range(runs):
                        on()
                finally:
                    task.STEPS = plain
        finally:
            runtime.shutdown()
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Each on/off pair ran back to back: the median of the pairs' differences cancels the
    # machine's drift, which the difference of two medians does not.
    diff = statistics.median(a - b for a, b in zip(samples["on"], samples["off"], strict=True))
    echo(f"lifecycle on {med['on'] * 1000:.1f} ms, off {med['off'] * 1000:.1f} ms")
    return {"files": files, "runs": runs, "operation": "no-change re-index", "median": med,
            "samples": samples, "paired_diff": diff, "overhead_ratio": diff / med["off"],
            "steps": {k: statistics.median(v) for k, v in per_step.items()}}
