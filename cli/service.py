"""Commands about the processes of the fleet: worker, flower, stats."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from cli.common import console, emit, long_running, settings_of


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker: `celery -A workers.app worker` with the given celery options."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", *ctx.args]
    env = os.environ.copy()
    env.setdefault("REMAP_SIGTERM", "SIGQUIT")  # read by billiard at import: cold shutdown
    os.execvpe(argv[0], argv, env)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True)
@click.pass_context
def flower(ctx: click.Context, address: str, port: int) -> None:
    """Run Flower with authentication required (FLOWER_USER / FLOWER_PASSWORD)."""
    settings = settings_of(ctx)
    if not settings.flower_password:
        raise click.ClickException("set FLOWER_PASSWORD: Flower never runs without a login")
    auth = f"{settings.flower_user}:{settings.flower_password}"
    env = {**os.environ, "FLOWER_BASIC_AUTH": auth}  # not on the command line
    argv = [sys.executable, "-m", "cli.flower_server", f"--address={address}", f"--port={port}",
            *ctx.args]
    os.execvpe(argv[0], argv, env)


def stats_table(docs: list[dict[str, Any]]) -> Any:
    """One row per worker child, then one per replica's outcomes (rich renderables)."""
    from rich.console import Group
    from rich.table import Table

    mib = 2**20
    children = Table(title="worker children", title_justify="left")
    for col in ("worker", "pid", "fds", "fd limit", "RSS MiB", "USS MiB", "threads", "ops",
                "pool size/avail/max", "waiting"):
        children.add_column(col, justify="left" if col == "worker" else "right")
    outcomes = Table(title="per replica", title_justify="left")
    for col in ("worker", "succeeded", "failed", "retried", "interrupted", "revoked",
                "cleanups failed", "leaks", "recycles"):
        outcomes.add_column(col, justify="left" if col == "worker" else "right")
    for doc in docs:
        for c in doc["children"]:
            pool = c["pool"]
            children.add_row(doc["worker"], str(c["pid"]), str(c["fds"]), str(c["fd_limit"]),
                             f"{c['rss'] / mib:.1f}", f"{c['uss'] / mib:.1f}", str(c["threads"]),
                             str(c["operations"]),
                             f"{pool['pool_size']}/{pool['pool_available']}/{pool['pool_max']}",
                             str(pool["requests_waiting"]))
        totals = doc["totals"]
        by_outcome: dict[str, int] = {}
        for _, outcome, n in totals["operations"]:
            by_outcome[outcome] = by_outcome.get(outcome, 0) + n

        def kv(d: dict[str, int]) -> str:
            return " ".join(f"{k}={v}" for k, v in sorted(d.items())) or "0"

        outcomes.add_row(doc["worker"], *(str(by_outcome.get(k, 0)) for k in
                                          ("succeeded", "failed", "retried", "interrupted",
                                           "revoked")),
                         str(totals["cleanups"].get("failed", 0)), kv(totals["leaks"]),
                         kv(totals["recycles"]))
    return Group(children, outcomes)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of replicas).")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Refresh a live table every SECONDS until Ctrl-C.")
@click.option("--timeout", type=float, default=2.0, show_default=True,
              help="Seconds to wait for the replicas' replies.")
def stats(as_json: bool, watch: float | None, timeout: float) -> None:
    """Resource use per worker child and outcomes per replica, from every running worker."""
    from rich.live import Live

    from workers.client import client, fleet_stats

    app = client()

    def current() -> list[dict[str, Any]]:
        return fleet_stats(app, timeout=timeout)

    if watch is None or as_json:
        docs = current()
        if not docs and not as_json:
            raise click.ClickException("no worker replied (none running on this broker?)")
        emit(docs, as_json, lambda: console().print(stats_table(docs)))
        return
    long_running()
    try:  # Ctrl-C may come at any moment, also while the first replies are awaited
        if not sys.stdout.isatty():  # a file or a pipe: one whole table per refresh
            out = console()
            while True:
                out.print(stats_table(current()))
                sys.stdout.flush()
                time.sleep(watch)
        with Live(stats_table(current()), auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(stats_table(current()), refresh=True)
    except KeyboardInterrupt:
        pass
