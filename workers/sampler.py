"""A resource sampler per worker child: RSS, USS, open fds, threads and pool usage.

Started after fork (``worker_process_init``), stopped on the way out; ``start``/``stop``
are idempotent and ``stop`` joins the thread, so none is left behind. The latest sample
is kept for the metrics and the stats command; each sample is logged at DEBUG.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from workers import memory
from workers.sentinel import PROC_READS

log = logging.getLogger("repoindex.sampler")


@dataclass(frozen=True)
class Sample:
    ts: float
    pid: int
    rss: int
    uss: int
    fds: int
    threads: int
    pool: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(pool_stats: Callable[[], dict[str, int]]) -> Sample:
    with PROC_READS:  # the leak sentinel lists fds only between these reads
        rss, uss, fds = memory.rss(), memory.uss(), len(os.listdir("/proc/self/fd"))
    return Sample(ts=time.time(), pid=os.getpid(), rss=rss, uss=uss, fds=fds,
                  threads=threading.active_count(), pool=pool_stats())


class SamplerState(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"


class Sampler:
    """Calls ``collect`` every ``period`` seconds on a thread of its own."""

    def __init__(self, period: float, collect: Callable[[], Sample],
                 on_sample: Callable[[Sample], None] | None = None) -> None:
        self.period = period
        self.latest: Sample | None = None
        self.state = SamplerState.STOPPED
        self._collect = collect
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.state is SamplerState.RUNNING:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                        name="repoindex-sampler", daemon=True)
        self.state = SamplerState.RUNNING
        self._thread.start()

    def stop(self) -> None:
        if self.state is SamplerState.STOPPED:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.period + 5)
        self._thread = None
        self.state = SamplerState.STOPPED

    def sample(self) -> Sample:
        """Take one sample now (also what the thread does every period)."""
        sample = self._collect()
        self.latest = sample
        if self._on_sample is not None:
            self._on_sample(sample)
        return sample

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.sample()
            except Exception:  # a failed sample must not end sampling
                log.exception("resource sample failed")
            stop.wait(self.period)


def log_sample(sample: Sample) -> None:
    log.debug("sample pid=%d rss_mib=%.1f uss_mib=%.1f fds=%d threads=%d pool=%s",
              sample.pid, sample.rss / 2**20, sample.uss / 2**20, sample.fds, sample.threads,
              sample.pool)
