"""Shutdown policy of a worker's main process: stop at once, whatever the signal.

Celery already offers the mechanism (README "Shutting down"): with ``REMAP_SIGTERM=SIGQUIT``
SIGTERM starts the *cold* shutdown, which cancels running operations (billiard raises
``SystemExit`` in the children, so every ``with``/``finally`` cleanup runs) and, with
``task_acks_late``, restores their messages to the queue. What it lacks, added here once
the worker is ready (Celery's own handlers are in place by then):

- SIGINT means the same as SIGTERM: Celery's first SIGINT is a warm shutdown, which
  waits for running operations without bound;
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
