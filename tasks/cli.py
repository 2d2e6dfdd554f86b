"""The ``repoindex`` command line. Every command takes ``--json``: one JSON document on the
last line of stdout, for machines; humans get tables and progress bars on a terminal."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from workers.errors import RepoindexError

JOB_STATES_DONE = ("SUCCESS", "FAILURE", "REVOKED")


def emit(doc: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(doc, default=str))
    else:
        human()


def job_status(job_id: str) -> dict[str, Any]:
    """``{"id", "state", "result" | "error" | "progress"}`` from the result backend, falling
    back to the run ledger when the backend has nothing (expired, or never reached)."""
    from celery.result import AsyncResult

    from workers.app import app

    res: AsyncResult[Any] = AsyncResult(job_id, app=app)
    state: str = str(res.state)
    doc: dict[str, Any] = {"id": job_id, "state": state}
    if state == "SUCCESS":
        doc["result"] = res.result
    elif state == "FAILURE":
        doc["error"] = str(res.result)
    elif state == "PROGRESS" and isinstance(res.info, dict):
        doc["progress"] = {"done": res.info.get("done"), "total": res.info.get("total")}
    elif state == "PENDING":
        doc.update(_ledger_status(job_id))
    return doc


def _ledger_status(job_id: str) -> dict[str, Any]:
    from workers import db
    from workers.settings import Settings

    try:
        with db.connect(Settings.from_env(), connect_timeout=3) as conn:
            row = conn.execute("SELECT state, error, counts FROM runs WHERE job_id = %s"
                               " ORDER BY id DESC LIMIT 1", (job_id,)).fetchone()
    except Exception:  # the ledger is a fallback; PENDING stands when it is unreachable
        return {}
    if row is None:
        return {}
    state = {"succeeded": "SUCCESS", "failed": "FAILURE", "running": "STARTED"}.get(row[0], row[0])
    extra: dict[str, Any] = {"state": state, "ledger": row[0]}
    if row[1]:
        extra["error"] = row[1]
    if row[2] is not None and state == "SUCCESS":
        extra["result"] = row[2]
    return extra


def wait_for(job_id: str, *, show: bool, timeout: float | None = None) -> dict[str, Any]:
    """Poll until the job ends, with a progress bar on stderr when ``show``."""
    from rich.progress import Progress

    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress(transient=True, disable=not show, console=_stderr()) as bar:
        task = bar.add_task(f"job {job_id[:8]}", total=None)
        while True:
            doc = job_status(job_id)
            if doc["state"] in JOB_STATES_DONE:
                return doc
            if "progress" in doc:
                bar.update(task, completed=doc["progress"]["done"], total=doc["progress"]["total"])
            if deadline is not None and time.monotonic() > deadline:
                return doc
            time.sleep(0.2)


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class _Group(click.Group):
    """Turns an unreachable broker or result backend into one clear line and exit code 3,
    instead of kombu's traceback after its retries."""

    def invoke(self, ctx: click.Context) -> Any:
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        try:
            return super().invoke(ctx)
        except (OperationalError, RedisConnectionError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "result store" not in str(exc):
                raise
            from workers.scrub import scrub
            from workers.settings import Settings

            url = scrub(Settings.from_env().redis_url)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            click.echo(f"repoindex: cannot reach Redis at {url} ({scrub(reason)});"
                       " is it running and is REDIS_URL right?", err=True)
            sys.exit(3)


@click.group(cls=_Group)
def main() -> None:
    """repoindex: index git repositories into PostgreSQL with Celery workers."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker: `celery -A workers.app worker` with the given celery options."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", *ctx.args]
    env = os.environ.copy()
    env.setdefault("REMAP_SIGTERM", "SIGQUIT")  # read by billiard at import: cold shutdown
    os.execvpe(argv[0], argv, env)


@main.command()
@click.argument("source")
@click.option("--name", help="Repository name (default: last component of SOURCE).")
@click.option("--ref", default="HEAD", show_default=True)
@click.option("--wait", is_flag=True, help="Wait, showing progress, and print the summary.")
@click.option("--json", "as_json", is_flag=True)
def enqueue(source: str, name: str | None, ref: str, wait: bool, as_json: bool) -> None:
    """Queue repoindex.index_repository for SOURCE and print the job id."""
    from workers.app import app

    kwargs: dict[str, Any] = {"source": source, "ref": ref}
    if name:
        kwargs["name"] = name
    job_id = app.send_task("repoindex.index_repository", kwargs=kwargs).id
    if not wait:
        emit({"id": job_id, "state": "PENDING"}, as_json, lambda: click.echo(job_id))
        return
    doc = wait_for(job_id, show=not as_json and sys.stderr.isatty())
    emit(doc, as_json, lambda: click.echo(_describe(doc)))
    sys.exit(0 if doc["state"] == "SUCCESS" else 1)


def _describe(doc: dict[str, Any]) -> str:
    if doc["state"] == "SUCCESS":
        return f"{doc['id']} SUCCESS\n" + json.dumps(doc["result"], indent=2, default=str)
    return f"{doc['id']} {doc['state']}" + (f": {doc['error']}" if doc.get("error") else "")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str, as_json: bool) -> None:
    """Show a job's state and its result or error."""
    doc = job_status(job_id)
    emit(doc, as_json, lambda: click.echo(_describe(doc)))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def repos(as_json: bool) -> None:
    """List indexed repositories."""
    from tasks import store

    with _connection() as conn:
        rows = store.repositories(conn)

    def table() -> None:
        for r in rows:
            click.echo(f"{r['name']}\t{r['files']} files\t{(r['commit'] or '')[:12]}\t"
                       f"{r['indexed_at']}\t{r['source']}")

    emit(rows, as_json, table)


@main.command()
@click.argument("pattern")
@click.option("--repo", help="Only this repository.")
@click.option("--regex", is_flag=True, help="PATTERN is a PostgreSQL regular expression.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def search(pattern: str, repo: str | None, regex: bool, limit: int, as_json: bool) -> None:
    """Print `repo:path:line: text` for lines matching PATTERN."""
    from tasks.search import search as run_search
    from workers.settings import Settings

    with _connection() as conn:
        try:
            found = run_search(conn, pattern, repo=repo, regex=regex, limit=limit,
                               timeout_ms=Settings.from_env().statement_timeout_ms)
        except RepoindexError as exc:
            raise click.ClickException(str(exc)) from None

    def lines() -> None:
        for m in found:
            click.echo(f"{m.repo}:{m.path}:{m.line}: {m.text}")

    emit([m.as_dict() for m in found], as_json, lines)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def delete(name: str, as_json: bool) -> None:
    """Queue repoindex.delete_repository for NAME and wait for it."""
    from workers.app import app

    job_id = app.send_task("repoindex.delete_repository", kwargs={"name": name}).id
    doc = wait_for(job_id, show=False)
    emit(doc, as_json, lambda: click.echo(_describe(doc)))


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
    for col in ("worker", "succeeded", "failed", "retried", "interrupted", "cleanups failed",
                "leaks", "recycles"):
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
                                          ("succeeded", "failed", "retried", "interrupted")),
                         str(totals["cleanups"].get("failed", 0)), kv(totals["leaks"]),
                         kv(totals["recycles"]))
    return Group(children, outcomes)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of replicas).")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Refresh a live table every SECONDS until Ctrl-C.")
@click.option("--timeout", type=float, default=2.0, show_default=True,
              help="Seconds to wait for the replicas' replies.")
def stats(as_json: bool, watch: float | None, timeout: float) -> None:
    """Resource use per worker child and outcomes per replica, from every running worker."""
    from rich.console import Console
    from rich.live import Live

    from workers.app import app
    from workers.monitor import fleet_stats

    def current() -> list[dict[str, Any]]:
        return fleet_stats(app, timeout=timeout)

    if watch is None or as_json:
        docs = current()
        if not docs and not as_json:
            raise click.ClickException("no worker replied (none running on this broker?)")
        emit(docs, as_json, lambda: Console().print(stats_table(docs)))
        return
    with Live(stats_table(current()), auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(stats_table(current()), refresh=True)
        except KeyboardInterrupt:
            pass


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True)
@click.pass_context
def flower(ctx: click.Context, address: str, port: int) -> None:
    """Run Flower with authentication required (FLOWER_USER / FLOWER_PASSWORD)."""
    password = os.environ.get("FLOWER_PASSWORD", "")
    if not password:
        raise click.ClickException("set FLOWER_PASSWORD: Flower never runs without a login")
    user = os.environ.get("FLOWER_USER", "") or "admin"
    env = {**os.environ, "FLOWER_BASIC_AUTH": f"{user}:{password}"}  # not on the command line
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower",
            f"--address={address}", f"--port={port}", *ctx.args]
    os.execvpe(argv[0], argv, env)


@main.command()
def migrate() -> None:
    """Create or update the database schema (workers also do this on first use)."""
    from workers.db import migrate as run_migrations

    with _connection() as conn:
        applied = run_migrations(conn)
    click.echo("applied: " + (", ".join(applied) or "nothing, schema is current"))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def demo(as_json: bool) -> None:
    """Start services and two workers, index this checkout, search, report, shut down."""
    from tasks.demo import run_demo

    report = run_demo(echo=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, default=str))
    sys.exit(0 if report["ok"] else 1)


@main.group()
def bench() -> None:
    """Benchmarks: tables of medians and ratios (not CI tests)."""


@bench.command("index")
@click.option("--files", default=10_000, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_index_cmd(files: int, runs: int, json_out: str | None) -> None:
    """Full index vs the floor, no-change re-index, peak RSS growth (real worker)."""
    from tasks.bench import bench_index, table, write_json

    doc = bench_index(files, runs, click.echo)
    med = doc["median"]
    click.echo(table([
        ("files", str(files)), ("runs (medians)", str(runs)),
        ("full index, ours", f"{med['ours']:.2f} s ({doc['files_per_s']:.0f} files/s)"),
        ("full index, floor", f"{med['floor']:.2f} s ({doc['floor_files_per_s']:.0f} files/s)"),
        ("ratio ours/floor", f"{doc['ratio_to_floor']:.2f}"),
        ("no-change re-index", f"{med['nochange']:.3f} s"),
        ("peak RSS growth of the child (max)",
         f"{max(doc['samples']['rss_growth']) / 2**20:.1f} MiB"),
        ("peak RSS of a git process (max)",
         f"{max(doc['samples']['git_peak_rss']) / 2**20:.1f} MiB"),
    ]))
    write_json(json_out, doc)


@bench.command("lifecycle")
@click.option("--files", default=2000, show_default=True)
@click.option("--runs", default=15, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_lifecycle_cmd(files: int, runs: int, json_out: str | None) -> None:
    """The same operation with the lifecycle machinery on and off."""
    from tasks.bench import bench_lifecycle, table, write_json

    doc = bench_lifecycle(files, runs, click.echo)
    med = doc["median"]
    click.echo(table([
        ("operation", f"no-change re-index of {files} files"), ("runs (medians)", str(runs)),
        ("lifecycle on", f"{med['on'] * 1000:.1f} ms"),
        ("lifecycle off", f"{med['off'] * 1000:.1f} ms"),
        ("median of paired differences", f"{doc['paired_diff'] * 1000:.2f} ms"),
        ("overhead", f"{doc['overhead_ratio'] * 100:.1f} %"),
    ]))
    write_json(json_out, doc)


@bench.command("shutdown")
@click.option("--runs", default=5, show_default=True)
@click.option("--op-seconds", default=40.0, show_default=True,
              help="Length of the operations in flight.")
@click.option("--grace", default=30.0, show_default=True,
              help="Seconds before SIGKILL, as Docker's stop timeout.")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_shutdown_cmd(runs: int, op_seconds: float, grace: float, json_out: str | None) -> None:
    """SIGTERM to our worker and to stock Celery signal handling, same operations."""
    from tasks.bench import bench_shutdown, write_json

    doc = bench_shutdown(runs, op_seconds, grace, click.echo)
    click.echo("| worker | median exit | max exit | SIGKILLed | jobs neither done nor requeued "
               "| temp files left | rows half-written |")
    click.echo("|---|---|---|---|---|---|---|")
    for mode, s in doc["summary"].items():
        click.echo(f"| {mode} | {s['median_s']:.2f} s | {s['max_s']:.2f} s | {s['sigkilled']}"
                   f"/{runs} | {s['jobs_not_accounted']} | {s['temp_left']}"
                   f" | {s['half_written']} |")
    write_json(json_out, doc)


@bench.command("all")
@click.option("--json-out", default="bench-all.json", show_default=True,
              help="Where the figures go (JSON).")
@click.option("--quick", is_flag=True, help="Small sizes: checks the command, not the figures.")
def bench_all_cmd(json_out: str, quick: bool) -> None:
    """Every benchmark in one run: one Markdown table, one JSON file."""
    from tasks.bench import all_rows, bench_all, table, write_json

    doc = bench_all(lambda line: click.echo(line, err=True), quick=quick)
    click.echo(table(all_rows(doc)))
    write_json(json_out, doc)


@bench.command("replicas")
@click.option("--counts", default="1,2,4", show_default=True, help="Replica counts to compare.")
@click.option("--jobs", default=40, show_default=True, help="Index jobs per measurement.")
@click.option("--files", default=500, show_default=True, help="Files per repository.")
@click.option("--runs", default=3, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_replicas_cmd(counts: str, jobs: int, files: int, runs: int,
                       json_out: str | None) -> None:
    """Throughput of 1, 2, 4 ... worker replicas (one child each) on one multi-job load."""
    from tasks.bench import bench_replicas, write_json

    doc = bench_replicas([int(c) for c in counts.split(",")], jobs, files, runs, click.echo)
    click.echo("| replicas | index operations/s (median) | speed-up |")
    click.echo("|---|---|---|")
    for n, rate in doc["ops_per_s"].items():
        click.echo(f"| {n} | {rate:.2f} | {doc['speedup'][n]:.2f}x |")
    write_json(json_out, doc)


@bench.command("soak")
@click.option("--ops", default=5000, show_default=True, help="Number of operations.")
@click.option("--duration", help="Run for a time instead, e.g. 24h, 90m, 600s.")
@click.option("--batch", default=20, show_default=True)
@click.option("--png", default="soak.png", show_default=True, help="Where the plot goes.")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_soak_cmd(ops: int, duration: str | None, batch: int, png: str,
                   json_out: str | None) -> None:
    """Mixed operations through a real worker; per-child RSS, USS, fds and sessions."""
    from pathlib import Path

    from tasks.bench import table, write_json
    from tasks.soak import soak

    seconds = None
    if duration:
        units = {"s": 1, "m": 60, "h": 3600}
        if duration[-1] not in units or not duration[:-1].isdigit():
            raise click.BadParameter("use a number and s, m or h, e.g. 24h", param_hint="duration")
        seconds = float(duration[:-1]) * units[duration[-1]]
    doc = soak(ops, seconds, batch, Path(png), click.echo)
    rows = [("operations", str(doc["operations"])), ("failed jobs", str(doc["failed"])),
            ("leak warnings", str(doc["leak_warnings"])),
            ("suspected memory leaks", str(doc["suspected_memory_leaks"])),
            ("max PostgreSQL sessions", str(doc["max_server_connections"]))]
    for pid, child in doc["children"].items():
        rows += [(f"child {pid}: fd growth after warm-up", str(child["fd_growth_after_warmup"])),
                 (f"child {pid}: RSS slope", f"{child['rss_slope_bytes_per_op']:.1f} B/op"),
                 (f"child {pid}: max RSS", f"{child['max_rss_mib']:.1f} MiB")]
    rows.append(("plot", doc["png"]))
    click.echo(table(rows))
    write_json(json_out, doc)


def _connection() -> Any:
    from workers import db
    from workers.settings import Settings

    settings = Settings.from_env()
    conn = db.connect(settings, autocommit=True)
    db.migrate(conn)
    return conn


if __name__ == "__main__":  # pragma: no cover
    main()
