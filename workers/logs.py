"""Logging: the job id and repository on every line of an operation; text or JSON.

The per-operation context lives in a ``ContextVar`` (the shape of structlog's
``bound_contextvars``), so it is right in threads and async code too.

Every record is one line that starts with its timestamp: caller-chosen strings (a task
id, a path) are logged with line breaks and other control characters escaped, and the
lines of a traceback are indented, so no text can forge a record of its own.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "repoindex_log_context", default={})  # noqa: B039 - never mutated, always replaced

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s%(ctx)s"
# C0 controls but tab, DEL, C1 controls, and what str.splitlines() also breaks on
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` on one line: control characters as ``\\n``, ``\\r`` or ``\\xNN``."""
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match[0]
    return {"\n": "\\n", "\r": "\\r"}.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


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
        # A line that names the job and repository itself (the cleanup line) is not
        # followed by them again in the text format.
        record.ctx = "" if getattr(record, "names_context", False) else \
            "".join(f" {k}={escape(v)}" for k, v in ctx.items())
        return True


class TextFormatter(logging.Formatter):
    """The text format, one record per line (tracebacks indented under it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\n    ")


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
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
