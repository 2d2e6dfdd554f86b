"""The per-operation leak sentinel.

Before and after each operation, in the child that runs it, it takes a snapshot of what
the process holds: open fds as (fd, target) pairs from /proc, live threads, child
processes, entries of this process in the temp root, and connections checked out of the
pool. Anything present after that was absent before is a leak: logged as one WARNING line
per resource, counted, and sent to Sentry when it is configured.

Long-lived infrastructure that may legitimately appear during an operation is exempt:
sockets the psycopg pool opened (its ``configure`` callback records them), sockets to
the Redis broker/backend (kombu connects lazily on the first result it stores), and epoll
instances (kombu's pollers, made when a child first publishes, e.g. a retry; nothing of
ours creates a lasting one).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from workers import kinds
from workers.metrics import is_bookkeeping_fd

log = logging.getLogger("repoindex.leak")
IGNORED_THREAD_PREFIXES = ("sentry-sdk",)  # Sentry starts its transport thread lazily
IGNORED_FD_TARGETS = frozenset({"anon_inode:[eventpoll]"})  # kombu's pollers
RECHECK_SECONDS = 0.05
# Held by the sampler while it reads this process's /proc files, and by the sentinel while
# it lists its fds: a sample's fds, open for a moment, are never taken for a leak (at a
# compressed soak's 50 ms period the recheck alone met one: /proc/<pid>/smaps_rollup).
PROC_READS = threading.Lock()


@dataclass(frozen=True)
class Snapshot:
    fds: frozenset[tuple[int, str]]
    threads: frozenset[tuple[int, str]]
    children: frozenset[int]
    temp: frozenset[str]
    connections: int


@dataclass(frozen=True)
class Leak:
    kind: str  # a ``leak`` spelling of workers.kinds
    detail: str


def open_fds(pid: int | str = "self") -> frozenset[tuple[int, str]]:
    """(fd, target) pairs of a process (this one by default); numbers alone are reused,
    targets tell them apart."""
    pairs = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            pairs.add((int(name), os.readlink(f"/proc/{pid}/fd/{name}")))
        except OSError:  # the fd of the listdir itself, closed meanwhile
            continue
    return frozenset(pairs)


def child_pids() -> frozenset[int]:
    """Direct children (zombies included) from /proc; psutil scans every process instead."""
    pids: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as fh:
                pids.update(int(p) for p in fh.read().split())
    except OSError:
        pids = {c.pid for c in psutil.Process().children()}
    return frozenset(pids)


def temp_entries(temp_root: Path) -> frozenset[str]:
    prefix = f"{os.getpid()}-"
    try:
        return frozenset(n for n in os.listdir(temp_root) if n.startswith(prefix))
    except FileNotFoundError:
        return frozenset()


@dataclass
class Sentinel:
    """Compares each operation's end state with its start state."""

    temp_root: Path
    checked_out: Callable[[], int]
    exempt_sockets: Callable[[], set[str]]
    endpoints: frozenset[tuple[str, int]] = frozenset()
    report: Callable[[Leak, str], None] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    _before: dict[str, Snapshot] = field(default_factory=dict)

    def snapshot(self) -> Snapshot:
        threads = frozenset((t.ident or 0, t.name) for t in threading.enumerate()
                            if not t.name.startswith(IGNORED_THREAD_PREFIXES))
        with PROC_READS:
            fds = open_fds()
        return Snapshot(fds, threads, child_pids(), temp_entries(self.temp_root),
                        self.checked_out())

    def before(self, op_id: str) -> None:
        self._before[op_id] = self.snapshot()

    def after(self, op_id: str) -> list[Leak]:
        """Leaks of ``op_id``; each is logged, counted and reported."""
        start = self._before.pop(op_id, None)
        if start is None:
            return []
        end = self.snapshot()
        new_fds = end.fds - start.fds
        if new_fds:
            # Other threads of the process (the sampler reading /proc, the pool connecting
            # in the background) hold fds for a moment: only what is still there counts.
            time.sleep(RECHECK_SECONDS)
            with PROC_READS:
                new_fds &= open_fds()
        leaks = [*self._fd_leaks(new_fds)]
        leaks += [Leak(kinds.THREADS.leak, f"thread={name} ident={ident}")
                  for ident, name in sorted(end.threads - start.threads)]
        leaks += [Leak(kinds.PROCESSES.leak, f"pid={pid}")
                  for pid in sorted(end.children - start.children)]
        leaks += [Leak(kinds.TEMP.leak, f"path={self.temp_root / n}")
                  for n in sorted(end.temp - start.temp)]
        if end.connections > start.connections:
            leaks.append(Leak(kinds.CONNECTIONS.leak,
                              f"checked_out={end.connections} before={start.connections}"))
        for leak in leaks:
            self.counts[leak.kind] += 1
            log.warning("leak op=%s kind=%s %s", op_id, leak.kind, leak.detail)
            if self.report is not None:
                self.report(leak, op_id)
        return leaks

    def _fd_leaks(self, new: Iterable[tuple[int, str]]) -> list[Leak]:
        new = sorted(new)
        exempt = self.exempt_sockets()
        sockets = [fd for fd, target in new if target.startswith("socket:")]
        remote = self._remote_endpoints(sockets) if sockets else {}
        return [Leak(kinds.FILES.leak, f"fd={fd} target={target}") for fd, target in new
                if target not in exempt and target not in IGNORED_FD_TARGETS
                and not is_bookkeeping_fd(target)  # the sampler's, not the operation's
                and remote.get(fd) not in self.endpoints]

    @staticmethod
    def _remote_endpoints(fds: list[int]) -> dict[int, tuple[str, int] | None]:
        wanted = set(fds)
        found: dict[int, tuple[str, int] | None] = {}
        for conn in psutil.Process().net_connections(kind="inet"):
            if conn.fd in wanted and conn.raddr:
                found[conn.fd] = (conn.raddr.ip, conn.raddr.port)
        return found
