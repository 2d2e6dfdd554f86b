"""What the end-to-end tests read and wait for: each worker child from outside (/proc),
from inside (probe.state), and the services (Redis queues, pg_stat_activity, the ledger)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from devtools.launcher import WorkerProcess
from workers.metrics import is_bookkeeping_fd
from workers.sentinel import open_fds


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def queue_length(queue: str) -> int:
    with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
        return int(client.llen(queue))


def ledger_states(db: psycopg.Connection[Any], job_id: str) -> list[str]:
    rows = db.execute("SELECT state FROM runs WHERE job_id = %s ORDER BY id", (job_id,))
    return [r[0] for r in rows]


def temp_areas(temp_root: Path) -> list[tuple[int, str]]:
    """(pid, name) of the per-operation temp areas (other entries are not ours to judge)."""
    return [(int(n.split("-", 1)[0]), n) for n in os.listdir(temp_root)
            if n.split("-", 1)[0].isdigit()]


def unclean_exits(log: str) -> list[str]:
    """Log lines saying a worker child ended without finishing its cleanup: the main
    process saw it go without its last word, or swept the temp areas it left."""
    return [line for line in log.splitlines()
            if "ended without shutting down" in line or "without their cleanup" in line]


def server_sessions(db: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    """(state, count) of our sessions that are not idle (active or idle in transaction)."""
    return db.execute("SELECT state, count(*) FROM pg_stat_activity WHERE application_name ="
                      " 'repoindex' AND state <> 'idle' AND datname = current_database()"
                      " GROUP BY state").fetchall()


def files_of(db: psycopg.Connection[Any], name: str) -> dict[str, tuple[str, str | None]]:
    """path -> (kind, symlink target) of a repository's indexed files."""
    rows = db.execute("SELECT f.path, f.kind, f.target FROM files f JOIN repositories r"
                      " ON r.id = f.repo_id WHERE r.name = %s", (name,)).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def child_state(pid: int, temp_root: Path) -> dict[str, Any]:
    """What a worker child holds, read from outside the process."""
    # the child's stats file (written right after each operation) and its sampler's /proc
    # reads are open for a moment: neither is one of an operation's resources
    fds = [fd for fd in open_fds(pid) if not is_bookkeeping_fd(fd[1])]
    temp = sorted(n for n in os.listdir(temp_root) if n.startswith(f"{pid}-")) \
        if temp_root.exists() else []
    return {"fds": set(fds), "threads": len(os.listdir(f"/proc/{pid}/task")),
            "children": [c.pid for c in psutil.Process(pid).children()], "temp": temp}


def fleet_state(worker: WorkerProcess, temp_root: Path) -> dict[int, dict[str, Any]]:
    return {pid: child_state(pid, temp_root) for pid in sorted(worker.children())}


def assert_same(after: dict[int, dict[str, Any]], before: dict[int, dict[str, Any]]) -> None:
    """Equal, or a readable list of what each child gained and lost."""
    assert sorted(after) == sorted(before), "children were replaced"
    diffs = {}
    for pid, state in after.items():
        base = before[pid]
        delta = {k: (sorted(set(state[k]) - set(base[k])), sorted(set(base[k]) - set(state[k])))
                 if k in ("fds", "children", "temp") else (state[k], base[k])
                 for k in state if state[k] != base[k]}
        if delta:
            diffs[pid] = delta
    assert not diffs, f"children differ from their baseline (gained, lost): {diffs}"


def leak_lines(worker: WorkerProcess) -> list[str]:
    return [ln for ln in worker.log().splitlines()
            if "leak op=" in ln or "ResourceWarning" in ln or "cleanup step failed" in ln]


def queue_of(worker: WorkerProcess) -> str:
    assert worker.queue is not None
    return worker.queue


def send(app: Any, worker: WorkerProcess, task: str, **kwargs: Any) -> Any:
    """Send to ``worker``'s own queue: the session's shared worker must not take it."""
    return app.send_task(task, kwargs=kwargs, queue=queue_of(worker))


def inside_states(app: Any, worker: WorkerProcess) -> dict[int, dict[str, Any]]:
    """probe.state from every child of ``worker`` (batches until each pid has answered)."""
    wanted, seen = set(worker.children()), {}
    for _ in range(10):
        batch = [send(app, worker, "probe.state", hold=0.3)
                 for _ in range(2 * len(wanted))]
        for r in batch:
            state = r.get(timeout=60)
            seen.setdefault(state["pid"], state)
        if wanted <= set(seen):
            settle(app, [worker])  # the batch's other probes may still hold a child
            return {pid: seen[pid] for pid in wanted}
    raise AssertionError(f"children {wanted - set(seen)} never answered")


def warm_up(app: Any, worker: WorkerProcess) -> None:
    """First operations open lazy connections (result backend, pool): not leaks. Each
    child must run one, so they are sent at once and each holds its child a moment."""
    n = 2 * len(worker.children())
    results = [send(app, worker, "probe.everything", tag=f"warm{i}", sleep=0.3)
               for i in range(n)]
    for r in results:
        r.get(timeout=60)
    inside_states(app, worker)


def settle(app: Any, workers: list[WorkerProcess], timeout: float = 30) -> None:
    """Wait until no worker of ``workers`` runs a task (e.g. the tail of a warm-up batch),
    so that a baseline read from outside is not taken mid-task."""
    names = [w.node for w in workers]

    def idle() -> bool:
        active = app.control.inspect(destination=names, timeout=2).active() or {}
        return len(active) == len(names) and not any(active.values())

    wait_until(idle, timeout, "workers idle")
