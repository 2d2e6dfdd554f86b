"""Operations that acquire (and deliberately leak) resources, run in real worker children.

They use the product's machinery (OperationTask, the scope, the pool) exactly as the
indexing tasks do; nothing of ours is patched.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import threading
import time
from typing import Any

from celery import shared_task

from workers import resources, runtime
from workers.sentinel import child_pids, open_fds, temp_entries
from workers.task import OperationTask

_RETAINED: list[bytes] = []


class ProbeFailure(RuntimeError):
    """A failure injected by a probe."""


def _files(rm: resources.ResourceManager, n: int) -> None:
    area = rm.temp_area()
    for i in range(n):
        fh = rm.open_file(area / f"f{i}.txt", "w")
        fh.write("x" * 10)


@shared_task(name="probe.open_files", base=OperationTask, bind=True)
def open_files(self: OperationTask, n: int, fail: bool = False) -> dict[str, Any]:
    rm = resources.current()
    _files(rm, n)
    live = rm.live()
    if fail:
        raise ProbeFailure(f"failing with {n} files open")
    return {"pid": os.getpid(), "live": live}


def _linger(stop: threading.Event, seconds: float) -> None:
    stop.wait(60)
    time.sleep(seconds)


@shared_task(name="probe.everything", base=OperationTask, bind=True)
def everything(self: OperationTask, tag: str, fail_at: str | None = None,
               sleep: float = 0.0, linger: float = 0.0) -> dict[str, Any]:
    """Files, a connection with an uncommitted insert, temp files, a git process, a thread
    (which, told to stop, takes ``linger`` seconds to end: a cleanup that lasts)."""
    rm = resources.current()
    steps = ["files", "connection", "temp", "process", "thread", "sleep", "end"]
    for step in steps:
        if step == fail_at:
            raise ProbeFailure(f"injected failure at {step}")
        if step == "files":
            _files(rm, 5)
        elif step == "connection":
            conn = rm.connection()
            conn.execute("INSERT INTO probe_rows (tag) VALUES (%s)", (tag,))
        elif step == "temp":
            for i in range(2):
                rm.temp_path(f"t{i}").write_text("temp")
        elif step == "process":
            rm.popen(["git", "cat-file", "--batch"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        elif step == "thread":
            rm.start_thread(lambda stop: _linger(stop, linger), name=f"probe-{tag}")
        elif step == "sleep":
            time.sleep(sleep)
    # after the sleep, so that a job seen STARTED is mid-sleep; the first report opens the
    # child's lasting event connection (a warm-up must have done that, as operations do)
    self.progress()(1, 1, "probing")
    live = rm.live()
    conn.commit()
    return {"pid": os.getpid(), "live": live}


@shared_task(name="probe.random_op", base=OperationTask, bind=True)
def random_op(self: OperationTask, seed: int, fail_rate: float = 0.1) -> dict[str, Any]:
    """Acquire a random mix of resources; fail at a random point with ``fail_rate``."""
    rng = random.Random(seed)
    fail_at = rng.choice(["files", "connection", "temp", "process", "thread", "end"]) \
        if rng.random() < fail_rate else None
    return everything.run(tag=f"r{seed}", fail_at=fail_at)  # type: ignore[no-any-return]


@shared_task(name="probe.leak_fd", base=OperationTask, bind=True)
def leak_fd(self: OperationTask) -> int:
    """Opens a file outside the scope and never closes it: the sentinel must say so."""
    path = resources.current().temp_area().parent / f"leaked-{os.getpid()}.txt"
    return os.open(path, os.O_CREAT | os.O_WRONLY)


@shared_task(name="probe.leak_thread", base=OperationTask, bind=True)
def leak_thread(self: OperationTask) -> str:
    thread = threading.Thread(target=time.sleep, args=(3,), name="probe-leaked-thread")
    thread.start()
    return thread.name


@shared_task(name="probe.retain", base=OperationTask, bind=True)
def retain(self: OperationTask, kib: int = 1024) -> int:
    """Keeps ``kib`` KiB alive after it returns (a memory leak on purpose)."""
    _RETAINED.append(os.urandom(kib * 1024))
    return len(_RETAINED)


@shared_task(name="probe.sleep", base=OperationTask, bind=True)
def sleep(self: OperationTask, seconds: float, tag: str = "") -> dict[str, Any]:
    rm = resources.current()
    rm.temp_path("sleeping").write_text(tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {"pid": os.getpid(), "tag": tag}


@shared_task(name="probe.index_after", base=OperationTask, bind=True)
def index_after(self: OperationTask, seconds: float, **kwargs: Any) -> dict[str, Any]:
    """``repoindex.index_repository(**kwargs)`` after ``seconds`` of work outside any
    transaction (as a slow clone would take): the real indexer, its commit path included."""
    from tasks import indexer, validate

    time.sleep(seconds)
    settings = runtime.current().settings
    return indexer.index_repository(resources.current(), settings,
                                    validate.index_args((), kwargs, settings.roots),
                                    job_id=self.request.id or "local",
                                    progress=self.progress())


@shared_task(name="probe.phases", base=OperationTask, bind=True)
def phases(self: OperationTask, names: list[str], steps: int, seconds: float) -> int:
    """Reports ``steps`` steps of each phase in ``names`` over ``seconds`` each."""
    report = self.progress()
    for name in names:
        for done in range(steps + 1):
            report(done, steps, name)
            time.sleep(seconds / steps)
    return len(names)


@shared_task(name="probe.state")
def state(hold: float = 0.0) -> dict[str, Any]:
    """This child's view of itself (not an operation: no scope of its own). ``hold`` keeps
    the child busy afterwards so that a batch of these reaches every child."""
    rt = runtime.current()
    gc.collect()
    time.sleep(hold)
    return {
        "pid": os.getpid(),
        "fds": sorted(open_fds()),
        "threads": sorted(t.name for t in threading.enumerate()),
        "children": sorted(child_pids()),
        "temp": sorted(temp_entries(rt.settings.temp_dir)),
        "pool": rt.db.stats(),
        "leaks": dict(rt.sentinel.counts),
    }


@shared_task(name="probe.suicide", base=OperationTask, bind=True)
def suicide(self: OperationTask) -> None:
    """Kills its own worker child (as the OOM killer would), every time it runs."""
    resources.current().temp_path("before-death").write_text("left behind")
    os.kill(os.getpid(), 9)
