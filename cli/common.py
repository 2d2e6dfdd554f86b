"""What every command group shares: the ``--json`` convention and a migrated connection.

The settings are read once, by the ``repoindex`` group (``ctx.obj``), and passed down.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from typing import Any

import click

from workers.settings import Settings


def console(**kwargs: Any) -> Any:
    """A rich Console; off a terminal, wide enough that no column is cut (rich's 80)."""
    import sys

    from rich.console import Console

    stream = sys.stderr if kwargs.get("stderr") else sys.stdout
    if not stream.isatty():
        kwargs.setdefault("width", 1000)
    return Console(**kwargs)


def long_running() -> None:
    """A command that goes on past its start (it waits, watches, benchmarks): collect
    reference cycles again, which ``cli.run`` stopped for the start-up."""
    gc.enable()


def emit(doc: Any, as_json: bool, human: Callable[[], None]) -> None:
    """One JSON document for machines (``--json``), else what ``human`` prints."""
    if as_json:
        click.echo(json.dumps(doc, default=str))
    else:
        human()


def connect(settings: Settings) -> Any:
    """An autocommit connection to a schema that is current (migrations applied)."""
    from workers import db

    conn = db.connect(settings, autocommit=True)
    db.migrate(conn)
    return conn


def settings_of(ctx: click.Context) -> Settings:
    """The settings the group read for this invocation."""
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings)
    return settings
