"""Memory release: return the operation's memory, watch the floor of RSS for a leak, and
say when this child will be replaced (README "Memory")."""

from __future__ import annotations

import logging
import os

from workers import memory
from workers.steps.base import Operation, Step

log = logging.getLogger("repoindex.runtime")


class MemoryRelease(Step):
    def after(self, op: Operation) -> None:
        rt = op.runtime
        memory.release()
        rt.leaks.observe(memory.rss())
        reason = memory.recycle_reason(rt.settings.max_memory_per_child_mb * 2**20)
        if reason is not None:
            rt.exit_reason = "memory"
            log.warning("recycle pid=%d reason=%s: the child is replaced after this operation",
                        os.getpid(), reason)
