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


def bench_lifecycle(files: int, runs: int, echo: Callable[[str], None]) -> dict[str, Any]:
    from tasks import jobs
    from workers import runtime

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
        finally:
            runtime.shutdown()
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Each on/off pair ran back to back: the median of the pairs' differences cancels the
    # machine's drift, which the difference of two medians does not.
    diff = statistics.median(a - b for a, b in zip(samples["on"], samples["off"], strict=True))
    echo(f"lifecycle on {med['on'] * 1000:.1f} ms, off {med['off'] * 1000:.1f} ms")
    return {"files": files, "runs": runs, "operation": "no-change re-index", "median": med,
            "samples": samples, "paired_diff": diff, "overhead_ratio": diff / med["off"]}
