"""The ``repoindex`` command line, one module per command group:

- ``jobs``: enqueue, status, delete (through the broker and the result backend);
- ``data``: repos, search, migrate (straight to PostgreSQL);
- ``service``: worker, flower, stats (processes of the fleet and their figures);
- ``bench``: the benchmark commands (drivers in the ``bench`` package);
- ``demo``: the whole product on one machine.

Every command takes ``--json``: one JSON document on the last line of stdout, for machines;
humans get tables and progress bars on a terminal.
"""

from __future__ import annotations

import gc
import importlib
import sys
from typing import Any

import click

from workers.settings import Settings

# Each command's module, imported only when that command runs (click's "lazily loading
# subcommands" pattern): `repoindex enqueue` never imports the benchmarks, the demo or rich.
COMMANDS = {
    "worker": "service", "flower": "service", "stats": "service",
    "enqueue": "jobs", "status": "jobs", "delete": "jobs",
    "repos": "data", "search": "data", "migrate": "data",
    "demo": "demo", "bench": "bench",
}


class _Group(click.Group):
    """Loads each command's module on first use, and turns an unreachable broker, result
    backend or database into one clear line and exit code 3, instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"cli.{module}"), cmd_name)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            service = _unreachable(exc)
            if service is None:
                raise
            from workers.scrub import scrub

            settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()
            url, variable = ((settings.redis_url, "REDIS_URL") if service == "Redis"
                             else (settings.database_url, "DATABASE_URL"))
            reason = " ".join(str(exc).split()) or type(exc).__name__
            click.echo(f"repoindex: cannot reach {service} at {scrub(url)} ({scrub(reason)});"
                       f" is it running and is {variable} right?", err=True)
            sys.exit(3)


def _unreachable(exc: Exception) -> str | None:
    """``Redis`` when ``exc`` says the broker or result backend cannot be reached,
    ``PostgreSQL`` when the database cannot be (refused, unknown host or database, login
    refused, the server gone mid-command), else None. Client libraries are imported only if
    something already did (a command that talks to one service never loads the other's)."""
    if isinstance(exc, RuntimeError) and "result store" in str(exc):
        return "Redis"
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            return "PostgreSQL"
    if "kombu" in sys.modules or "redis" in sys.modules:
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        if isinstance(exc, OperationalError | RedisConnectionError):
            return "Redis"
    return None


@click.group(cls=_Group)
@click.pass_context
def main(ctx: click.Context) -> None:
    """repoindex: index git repositories into PostgreSQL with Celery workers."""
    ctx.obj = Settings.from_env()  # the one read of this process's settings


def run() -> None:
    """The ``repoindex`` console script: ``main`` with the cyclic garbage collector off.

    A command is a short process whose time is mostly imports (celery, redis-py, psycopg:
    ~400,000 objects); the collector walking them cost ~40 ms of the ~350 ms of a `status`
    the run ledger answers. Reference counting still frees everything not in a cycle; a
    command that goes on running turns the collector back on (``common.long_running``)."""
    gc.disable()
    main()
