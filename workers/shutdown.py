"""Shutdown policy of a worker's main process: stop at once, whatever the signal.

Celery already offers the mechanism (README "Shutting down"): with ``REMAP_SIGTERM=SIGQUIT``
SIGTERM starts the *cold* shutdown, which cancels running operations (billiard raises
``SystemExit`` in the children, so every ``with``/``finally`` cleanup runs) and, with
``task_acks_late``, restores their messages to the queue. This bootstep adds what it lacks:

- the signal wakes the event loop: Celery's handler only sets a flag that the loop checks
  after its next poll (up to ~2 s later); a wakeup fd registered with the hub makes the
  poll return at once;
- SIGINT means the same as SIGTERM (Celery's first SIGINT is a warm shutdown, which waits
  for running operations without bound);
- a loud warning when ``REMAP_SIGTERM`` is not set (``celery worker`` started by hand),
  because SIGTERM then waits for running operations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

from celery import bootsteps

log = logging.getLogger("repoindex.shutdown")


class PromptShutdown(bootsteps.StartStopStep):
    """Worker bootstep (main process) that makes shutdown signals act immediately."""

    requires = ("celery.worker.components:Hub",)
    label = "PromptShutdown"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._pipe: tuple[int, int] | None = None
        self._previous = -1

    def start(self, worker: Any) -> None:
        from billiard.common import REMAP_SIGTERM

        if REMAP_SIGTERM != "SIGQUIT":
            log.warning("REMAP_SIGTERM is not SIGQUIT: SIGTERM will wait for running operations"
                        " without bound; start workers with `repoindex worker`")
        if worker.hub is None:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        worker.hub.add_reader(read_fd, _drain, read_fd)
        self._pipe = (read_fd, write_fd)

    def stop(self, worker: Any) -> None:
        if self._pipe is None:
            return
        read_fd, write_fd = self._pipe
        self._pipe = None
        with contextlib.suppress(ValueError):  # not the main thread: nothing was set there
            signal.set_wakeup_fd(self._previous)
        if worker.hub is not None:
            worker.hub.remove_reader(read_fd)
        os.close(read_fd)
        os.close(write_fd)

    shutdown = stop


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 512):
            pass


def sigint_is_cold(worker: Any) -> None:
    """Make SIGINT start the cold shutdown, like SIGTERM (called once the worker is ready,
    after Celery has installed its own handlers)."""
    from celery.apps.worker import (  # type: ignore[attr-defined]  # not in celery-types
        install_worker_term_hard_handler,
    )

    install_worker_term_hard_handler(worker, sig="SIGINT")
