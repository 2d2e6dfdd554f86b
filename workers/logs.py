"""Logging: the job id and repository on every line of an operation; text or JSON.

The per-operation context lives in a ``ContextVar`` (the shape of structlog's
``bound_contextvars``), so it is right in threads and async code too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "repoindex_log_context", default={})  # noqa: B039 - never mutated, always replaced

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s%(ctx)s"


@contextmanager
def bound(**values: str) -> Iterator[None]:
    """Add ``values`` to every log record made inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in values.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**values: str) -> None:
    """Add to the current context (e.g. once the repository name is known)."""
    _context.set({**_context.get(), **{k: v for k, v in values.items() if v}})


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (``record.ctx`` for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        record.context = ctx
        record.ctx = "".join(f" {k}={v}" for k, v in ctx.items())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            **getattr(record, "context", {}),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger (replacing earlier ones)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
