"""The vocabularies of the runtime, each written once (a leaf: imports nothing of ours).

``RESOURCES`` is the one table of resource kinds. A kind has two published spellings, side
by side here: ``scope`` names it in the ResourceManager (its registry, the ``cleanup`` log
line, the ledger's ``cleanup.acquired`` JSON) and ``leak`` in the sentinel (the ``leak``
log line, Sentry, the ``kind`` label of ``repoindex_leaks_total``). A kind with no
``leak`` is not visible from outside the scope (asyncio tasks); one with no ``scope`` is
not acquired through it (memory, watched by the leak detector).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    """The life of a resource scope or a pool: unopened -> open -> closed, once."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Kind:
    scope: str  # "" when not acquired through the scope
    leak: str  # "" when not visible to the sentinel


FILES = Kind("files", "fd")
CONNECTIONS = Kind("connections", "connection")
TEMP = Kind("temp", "temp")
PROCESSES = Kind("processes", "process")
THREADS = Kind("threads", "thread")
TASKS = Kind("tasks", "")
MEMORY = Kind("", "memory")

RESOURCES = (FILES, CONNECTIONS, TEMP, PROCESSES, THREADS, TASKS, MEMORY)
SCOPE_KINDS = tuple(k.scope for k in RESOURCES if k.scope)  # the scope's counters, in order
LEAK_KINDS = tuple(k.leak for k in RESOURCES if k.leak)  # label values present from the start
