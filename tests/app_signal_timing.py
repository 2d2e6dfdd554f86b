"""The test worker app with a signal sent at an exact instant of the main process, for
the shutdown tests that need one (``tests/e2e/test_shutdown.py``).

A test instrument, not a patch: it wraps two points of Celery's own code in the worker's
main process only to *send a signal* there, and changes nothing else. Chosen by
``REPOINDEX_TEST_SIGNAL_AT``:

- ``result:N``: SIGTERM to this process right after the event loop has read the 4-byte
  length of the Nth message of a child's result pipe, before its body (one child sends
  WORKER_UP, then its first job's ACK, then its READY: ``result:3`` lands inside the
  first job's result). Celery's ``ResultHandler._recv_message`` takes the read function
  as an argument; this passes one that signals after the length.
- ``cancel``: SIGTERM again right after the cold shutdown has cancelled its first running
  request (``Request._announce_cancelled``, which follows the signal to that request's
  child), then 50 ms for the signalled children to begin their cleanup, so that a second
  signal to any of them would land inside it.

Each prints one ``signal-timing:`` line to stderr (the worker log) when it fires.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from celery.concurrency import asynpool
from celery.worker import request

from tests.app import app

__all__ = ["app"]
WHEN = os.environ.get("REPOINDEX_TEST_SIGNAL_AT", "")


def _say(text: str) -> None:
    print(f"signal-timing: {text}", file=sys.stderr, flush=True)


if WHEN.startswith("result:"):
    _nth = int(WHEN.split(":", 1)[1])
    _lengths: dict[int, int] = {}
    _read = asynpool.__read__

    def _read_then_signal(fd: int, buf: Any, size: int, *rest: Any) -> int:
        n: int = _read(fd, buf, size, *rest)
        if size == 4 and n == 4:  # a whole length: the header of the next message
            _lengths[fd] = _lengths.get(fd, 0) + 1
            if _lengths[fd] == _nth:
                _say(f"SIGTERM after the length of message {_nth} of fd {fd}")
                os.kill(os.getpid(), signal.SIGTERM)
        return n

    class _ResultHandler(asynpool.ResultHandler):  # type: ignore[misc]
        def _recv_message(self, add_reader: Any, fd: int, callback: Any,
                          **kwargs: Any) -> Any:
            return super()._recv_message(add_reader, fd, callback,
                                         __read__=_read_then_signal)

    asynpool.AsynPool.ResultHandler = _ResultHandler

elif WHEN == "cancel":
    _announce = request.Request._announce_cancelled
    _sent = [False]

    def _announce_then_signal(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = _announce(self, *args, **kwargs)
        if not _sent[0]:
            _sent[0] = True
            _say(f"second SIGTERM after cancelling {self.id}")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        return result

    request.Request._announce_cancelled = _announce_then_signal

elif WHEN:
    raise ValueError(f"REPOINDEX_TEST_SIGNAL_AT={WHEN!r}: expected result:N or cancel")
