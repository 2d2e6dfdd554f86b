"""Shutdown policy of a worker's main process: stop at once, whatever the signal, and
never from inside a signal handler.

Celery already offers the mechanism (README "Shutting down"): with ``REMAP_SIGTERM=SIGQUIT``
SIGTERM starts the *cold* shutdown, which cancels running operations (billiard raises
``SystemExit`` in the children, so every ``with``/``finally`` cleanup runs) and, with
``task_acks_late``, restores their messages to the queue. What it lacks, added here once
the worker is ready (Celery's own handlers are in place by then):

- SIGINT means the same as SIGTERM: Celery's first SIGINT is a warm shutdown, which
  waits for running operations without bound;
- the cold shutdown runs from the event loop, not from the signal handler. Celery runs it
  inside the handler, that is wherever the main thread was when the signal landed, and it
  stops the pool there: it reads the children's result pipes and writes their job pipes.
  A signal that lands while the event loop is half-way through a child's result message
  (its 4-byte length read, the body not yet) makes that read consume the body's first
  bytes as a length, and the loop then resumes reading at the wrong offset:
  ``UnpicklingError("invalid load key, '\\x00'.")``, exit 1, the finished job restored,
  or a hang while the child waits for its result to be taken. So the handler only notes
  the signal and writes a byte to a pipe the loop watches (``LoopHook``); the loop runs
  Celery's handler at the top of its next iteration, where no read or write is half done;
- a repeated signal cannot signal a child twice. Celery's handler for the next signal
  (it installs it as soon as the cold shutdown starts) cancels the running requests
  again; landing while the first pass is still cancelling them, it signals each child the
  first pass had not reached yet, the first pass then signals those children a second
  time, and billiard ends a child that gets a second terminate signal at once
  (``os._exit``), in the middle of its cleanup (a temp area left, its ledger row left
  ``running``). So the running requests are cancelled here first, while repeats are
  still folded into the first signal; Celery's own pass, and any repeat's, find none left;
- a signal during start-up: a cold shutdown that lands while the consumer starts (during
  mingle) terminates the pool, and Celery's event loop then asks the gone pool whether its
  children started (``'NoneType' object has no attribute 'did_start_ok'``, exit 1);
  ``guard_startup`` answers for it, so the loop reaches its shutdown check and exits 0;
- a loud warning when ``REMAP_SIGTERM`` is not set (``celery worker`` started by hand):
  SIGTERM then waits for running operations.

When the event loop is not running (start-up, reconnecting to Redis) the handler runs the
shutdown itself, as Celery does; so it does when the loop has not taken a first signal
within ``ESCALATE_AFTER`` seconds and another one comes. Once the cold shutdown has
begun, further signals are Celery's (README "Shutting down").

What remains of the ~1.8 s from signal to exit is billiard's own: each child sleeps 1 s
after reporting its exit (``billiard/pool.py``, ``Worker._do_exit``), the pool's handler
threads are joined (~0.5 s), then the interpreter exits (~0.3 s), measured with strace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from celery import bootsteps

log = logging.getLogger("repoindex.shutdown")
ESCALATE_AFTER = 5.0  # seconds a first signal may wait for the loop before a repeat acts


class _Pending:
    """The main process's shutdown request (module state: there is one main thread)."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.celery: dict[int, Callable[..., Any]] = {}  # Celery's handler per signal
        self.loop_code: CodeType | None = None  # celery.worker.loops.asynloop
        self.hub: Any = None
        self.pipe: tuple[int, int] | None = None  # (read, write), non-blocking
        self.signum: int | None = None
        self.since = 0.0
        self.started = False
        self.repeats = 0


_pending = _Pending()


def install_handlers(worker: Any) -> None:
    """Make SIGINT start the cold shutdown; run the cold shutdown from the event loop;
    warn when SIGTERM would not start it."""
    from billiard.common import REMAP_SIGTERM
    from celery.apps.worker import (  # type: ignore[attr-defined]  # not in celery-types
        install_worker_term_hard_handler,
    )
    from celery.worker import loops

    if REMAP_SIGTERM != "SIGQUIT":
        log.warning("REMAP_SIGTERM is not SIGQUIT: SIGTERM will wait for running operations"
                    " without bound; start workers with `repoindex worker`")
    install_worker_term_hard_handler(worker, sig="SIGINT")
    _pending.worker = worker
    _pending.loop_code = loops.asynloop.__code__
    # Celery's cold-shutdown handlers; SIGTERM's is the warm one (flags only) without the remap
    names = ["SIGINT", "SIGQUIT", *(["SIGTERM"] if REMAP_SIGTERM == "SIGQUIT" else [])]
    for name in names:
        signum = getattr(signal, name)
        current = signal.getsignal(signum)
        if callable(current) and current is not _on_signal:
            _pending.celery[signum] = current
            signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The main process's shutdown signals: note, wake the loop, return."""
    p = _pending
    if p.signum is None:
        p.signum, p.since = signum, time.monotonic()
        if _loop_will_run(frame):
            _wake()
            return
    elif p.started or time.monotonic() - p.since < ESCALATE_AFTER:
        p.repeats += 1  # folded into the first
        return
    _run()  # no loop to take it (or it is stuck): as Celery would, from here


def _loop_will_run(frame: FrameType | None) -> bool:
    """Is the main thread inside the consumer's event loop, which watches our pipe?"""
    p = _pending
    if p.hub is None or p.pipe is None or p.hub.readers.get(p.pipe[0]) is None:
        return False
    while frame is not None:
        if frame.f_code is p.loop_code:
            return True
        frame = frame.f_back
    return False


def _wake() -> None:
    if _pending.pipe is not None:
        with contextlib.suppress(OSError):  # full: a wake-up is already waiting
            os.write(_pending.pipe[1], b"\0")


def _on_wakeup() -> None:
    """The loop saw the pipe: run the shutdown at the top of its next iteration."""
    p = _pending
    if p.pipe is not None:
        with contextlib.suppress(OSError):
            while os.read(p.pipe[0], 64):
                pass
    if p.signum is not None and not p.started and p.hub is not None:
        p.hub.call_soon(_run)


def _on_hub_close(hub: Any) -> None:
    # The loop ended with an error (Redis lost) before it took the request: take it now,
    # between loops, where no read or write is half done either.
    if _pending.signum is not None and not _pending.started:
        _run()


def _run() -> None:
    """Cancel the running requests, then Celery's cold shutdown (pool stopped, joined)."""
    p = _pending
    if p.signum is None or p.started:
        return
    p.started = True
    worker, handler = p.worker, p.celery.get(p.signum)
    children = _children()
    consumer = getattr(worker, "consumer", None)
    try:
        # with a soft shutdown configured Celery waits for the operations first: leave it
        if consumer is not None and not worker.app.conf.worker_soft_shutdown_timeout:
            consumer.cancel_active_requests()
        if handler is not None:
            handler(p.signum, None)
    finally:
        if p.repeats:
            log.info("shutdown: %d repeated signal(s) folded into the first", p.repeats)
        sweep_after_pool(children)


def _children() -> set[int]:
    import psutil

    try:
        return {c.pid for c in psutil.Process().children()}
    except psutil.Error:  # pragma: no cover - /proc unreadable
        return set()


def sweep_after_pool(children: set[int]) -> None:
    """The pool is joined: remove the temp areas of those of ``children`` that ended
    without their cleanup (a terminate signal sent straight to them twice, SIGKILL),
    instead of leaving them for the next worker's children to sweep."""
    from workers import runtime
    from workers.settings import process_settings

    try:
        runtime.sweep_temp(process_settings().temp_dir, pids=children,
                           why="of worker children that ended without their cleanup")
    except Exception:  # pragma: no cover - shutting down: never mask the shutdown
        log.exception("shutdown: temp sweep failed")


def attach(hub: Any) -> None:
    """Watch the wake-up pipe from this (re)started event loop."""
    p = _pending
    if p.pipe is None:
        p.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    p.hub = hub
    hub.add_reader(p.pipe[0], _on_wakeup)
    hub.on_close.add(_on_hub_close)
    if p.signum is not None and not p.started:
        _wake()


def forget_in_child() -> None:
    """In a freshly forked child: close the main process's pipe copy, drop its state."""
    global _pending
    if _pending.pipe is not None:
        for fd in _pending.pipe:
            with contextlib.suppress(OSError):
                os.close(fd)
    _pending = _Pending()


class LoopHook(bootsteps.StartStopStep):
    """A worker step whose only part is Celery's ``register_with_event_loop``, called each
    time the consumer's loop (re)starts (after a reconnect the hub has dropped every fd).
    A start/stop step: only those are kept in the worker's ``steps``, which that call
    walks."""

    label = "repoindex shutdown signals"
    requires = ("celery.worker.components:Hub",)

    def register_with_event_loop(self, worker: Any, hub: Any) -> None:
        attach(hub)


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
