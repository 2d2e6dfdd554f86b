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

import sys
from typing import Any

import click

from cli import bench, data, demo, jobs, service
from workers.settings import Settings


class _Group(click.Group):
    """Turns an unreachable broker or result backend into one clear line and exit code 3,
    instead of kombu's traceback after its retries."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not _unreachable_redis(exc):
                raise
            from workers.scrub import scrub

            settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()
            url = scrub(settings.redis_url)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            click.echo(f"repoindex: cannot reach Redis at {url} ({scrub(reason)});"
                       " is it running and is REDIS_URL right?", err=True)
            sys.exit(3)


def _unreachable_redis(exc: Exception) -> bool:
    """Whether ``exc`` says the broker or result backend cannot be reached. kombu and redis
    are imported only if something already did (commands that talk to PostgreSQL alone
    start without them)."""
    if isinstance(exc, RuntimeError):
        return "result store" in str(exc)
    if "kombu" not in sys.modules and "redis" not in sys.modules:
        return False
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    return isinstance(exc, OperationalError | RedisConnectionError)


@click.group(cls=_Group)
@click.pass_context
def main(ctx: click.Context) -> None:
    """repoindex: index git repositories into PostgreSQL with Celery workers."""
    ctx.obj = Settings.from_env()  # the one read of this process's settings


for _group in (service, jobs, data, demo, bench):
    for _command in _group.COMMANDS:
        main.add_command(_command)
