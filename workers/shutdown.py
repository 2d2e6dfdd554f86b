"""Shutdown policy of a worker's main process: stop at once, whatever the signal.

Celery already offers the mechanism (README "Shutting down"): with ``REMAP_SIGTERM=SIGQUIT``
SIGTERM starts the *cold* shutdown, which cancels running operations (billiard raises
``SystemExit`` in the children, so every ``with``/``finally`` cleanup runs) and, with
``task_acks_late``, restores their messages to the queue. What it lacks, added here once
the worker is ready (Celery's own handlers are in place by then):

- SIGINT means the same as SIGTERM: Celery's first SIGINT is a warm shutdown, which
  waits for running operations without bound;
- a signal during start-up: a cold shutdown that lands while the consumer starts (during
  mingle) terminates the pool, and Celery's event loop then asks the gone pool whether its
  children started (``'NoneType' object has no attribute 'did_start_ok'``, exit 1);
  ``guard_startup`` answers for it, so the loop reaches its shutdown check and exits 0;
- a loud warning when ``REMAP_SIGTERM`` is not set (``celery worker`` started by hand):
  SIGTERM then waits for running operations.

What remains of the ~1.8 s from signal to exit is billiard's own: each child sleeps 1 s
after reporting its exit (``billiard/pool.py``, ``Worker._do_exit``), the pool's handler
threads are joined (~0.5 s), then the interpreter exits (~0.3 s), measured with strace.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("repoindex.shutdown")


def install_handlers(worker: Any) -> None:
    """Make SIGINT start the cold shutdown; warn when SIGTERM would not."""
    from billiard.common import REMAP_SIGTERM
    from celery.apps.worker import (  # type: ignore[attr-defined]  # not in celery-types
        install_worker_term_hard_handler,
    )

    if REMAP_SIGTERM != "SIGQUIT":
        log.warning("REMAP_SIGTERM is not SIGQUIT: SIGTERM will wait for running operations"
                    " without bound; start workers with `repoindex worker`")
    install_worker_term_hard_handler(worker, sig="SIGINT")


def guard_startup(worker: Any) -> None:
    """Let a pool terminated by a shutdown signal during start-up answer Celery's
    ``did_start_ok`` (asked once, when the consumer's loop begins) instead of raising."""
    pool = getattr(worker, "pool", None)
    if pool is None or not hasattr(pool, "did_start_ok"):
        return
    asked = pool.did_start_ok

    def did_start_ok() -> bool:
        if getattr(pool, "_pool", True) is None:  # terminated: the loop's next check exits
            return True
        return bool(asked())

    pool.did_start_ok = did_start_ok
