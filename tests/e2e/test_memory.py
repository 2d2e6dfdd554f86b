"""Memory in real worker children: bounded while indexing, back to baseline after, leaks
suspected (and only leaks), and a child over its limit replaced between operations."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.launcher import WorkerProcess
from tests import gitrepo
from tests.conftest import start_worker
from tests.e2e.support import wait_until
from workers.memory import proc_status

MIB = 1 << 20


def reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def repo_10k(roots: Path) -> Path:
    repo = roots / "memory-10k"
    gitrepo.generated(repo, files=10_000)
    return repo


@pytest.fixture
def one_child() -> Iterator[WorkerProcess]:
    queue = f"mem-{uuid.uuid4().hex[:6]}"
    worker = start_worker("memory", concurrency=1, queue=queue)
    yield worker
    assert worker.stop() == 0


def index(app: Any, worker: WorkerProcess, source: Path, name: str) -> dict[str, Any]:
    return app.send_task("repoindex.index_repository", queue=worker.queue,  # type: ignore
                         kwargs={"source": str(source), "name": name}).get(timeout=300)


def test_large_repository_bounded_and_back_to_baseline(celery_app: Any, roots: Path,
                                                       repo_10k: Path,
                                                       one_child: WorkerProcess) -> None:
    """10,000 files: peak growth <= 64 MiB; RSS after <= 110% of the post-warm-up
    baseline; three more operations do not raise it."""
    small = gitrepo.init(roots / f"warm-{uuid.uuid4().hex[:4]}")
    gitrepo.write(small / "a.txt", "warm\n")
    gitrepo.commit(small)
    for i in range(3):
        index(celery_app, one_child, small, f"warm{i}")
    [child] = one_child.children()
    baseline = proc_status(child, "VmRSS")
    reset_peak(child)
    result = index(celery_app, one_child, repo_10k, "mem10k")
    assert result["read"] > 10_000
    growth = proc_status(child, "VmHWM") - baseline
    after = proc_status(child, "VmRSS")
    print(f"baseline {baseline / MIB:.1f} MiB, peak growth {growth / MIB:.1f} MiB, "
          f"after {after / MIB:.1f} MiB")
    assert growth <= 64 * MIB
    assert after <= 1.10 * baseline
    for i in range(3):
        index(celery_app, one_child, repo_10k if i % 2 else small, f"again{i}")
        assert proc_status(child, "VmRSS") <= 1.10 * baseline
    assert one_child.children() == [child]


LEAK_ENV = {"REPOINDEX_LEAK_WARMUP": "5", "REPOINDEX_LEAK_WINDOW": "5",
            "REPOINDEX_LEAK_WINDOWS": "3", "REPOINDEX_LEAK_MIN_GROWTH_KB": "1024"}


def test_retaining_task_is_suspected_with_an_allocation_file(celery_app: Any,
                                                             temp_root: Path) -> None:
    queue = f"leak-{uuid.uuid4().hex[:6]}"
    worker = start_worker("leaky", concurrency=1, queue=queue,
                          env={**LEAK_ENV, "REPOINDEX_TRACEMALLOC": "1"})
    try:
        ops = 0
        while "suspected memory leak" not in worker.log() and ops < 60:
            celery_app.send_task("probe.retain", queue=queue, kwargs={"kib": 2048}).get(60)
            ops += 1
        # warm-up 5, then the floors of 4 windows of 5 (3 growths between them)
        assert ops == 25, ops
        line = next(ln for ln in worker.log().splitlines() if "suspected memory leak" in ln)
        match = re.search(r"allocations=(\S+)", line)
        assert match, line
        assert "probe_tasks.py" in Path(match.group(1)).read_text()
    finally:
        assert worker.stop() == 0


def test_clean_operations_raise_no_suspicion(celery_app: Any, probe_table: None) -> None:
    """500 clean operations (10% failing on purpose) with the same sensitive settings."""
    queue = f"clean-{uuid.uuid4().hex[:6]}"
    worker = start_worker("clean", concurrency=1, queue=queue, env=LEAK_ENV)
    try:
        jobs = [celery_app.send_task("probe.random_op", queue=queue, kwargs={"seed": s})
                for s in range(500)]
        for job in jobs:
            job.get(timeout=300, propagate=False)
        assert sum(j.state == "SUCCESS" for j in jobs) > 400
        assert "suspected memory leak" not in worker.log()
    finally:
        assert worker.stop() == 0


def test_child_over_memory_limit_is_replaced_after_its_operation(celery_app: Any) -> None:
    queue = f"recycle-{uuid.uuid4().hex[:6]}"
    worker = start_worker("recycle", concurrency=1, queue=queue,
                          env={"REPOINDEX_MAX_MEMORY_PER_CHILD_MB": "200"})
    try:
        [before] = worker.children()
        job = celery_app.send_task("probe.retain", queue=queue, kwargs={"kib": 250 * 1024})
        assert job.get(timeout=120) == 1
        wait_until(lambda: worker.children() not in ([], [before]), 30, "a new child")
        assert re.search(rf"recycle pid={before} reason=memory peak_rss=\d+MiB limit=200MiB",
                         worker.log())
        again = celery_app.send_task("probe.retain", queue=queue, kwargs={"kib": 1})
        assert again.get(timeout=60) == 1  # a fresh child: its list starts empty
    finally:
        assert worker.stop() == 0
