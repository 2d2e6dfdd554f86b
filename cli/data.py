"""Commands that read or shape the database directly: repos, search, migrate."""

from __future__ import annotations

from typing import Any

import click

from cli.common import connect, emit, settings_of
from workers.errors import RepoindexError


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def repos(ctx: click.Context, as_json: bool) -> None:
    """List indexed repositories."""
    from tasks import store

    with connect(settings_of(ctx)) as conn:
        rows = store.repositories(conn)

    def table() -> None:
        for r in rows:
            click.echo(f"{r['name']}\t{r['files']} files\t{(r['commit'] or '')[:12]}\t"
                       f"{r['indexed_at']}\t{r['source']}")

    emit(rows, as_json, table)


class BadSearch(click.ClickException):
    exit_code = 2  # usage or bad input (README "Exit statuses")


@click.command()
@click.argument("pattern")
@click.option("--repo", "repos", multiple=True, help="Only this repository (repeatable).")
@click.option("--regex", is_flag=True, help="PATTERN is a PostgreSQL regular expression (ARE).")
@click.option("-i", "--ignore-case", is_flag=True, help="Match case-insensitively.")
@click.option("--path", "paths", multiple=True, metavar="GLOB",
              help="Only paths matching GLOB (repeatable): *.py, lib/**/test_*.")
@click.option("--lang", "langs", multiple=True, help="Only files of this language (repeatable).")
@click.option("-C", "--context", default=0, type=click.IntRange(0, 10),
              help="Lines of context before and after each match (0-10).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def search(ctx: click.Context, pattern: str, repos: tuple[str, ...], regex: bool,
           ignore_case: bool, paths: tuple[str, ...], langs: tuple[str, ...], context: int,
           limit: int, as_json: bool) -> None:
    """Print `repo:path:line: text` for each line matching PATTERN, as `git grep -n` would
    (exit 0; 1: no match; 4: more matches than --limit, notice on stderr)."""
    from tasks.search import search as run_search

    settings = settings_of(ctx)
    with connect(settings) as conn:
        try:
            found = run_search(conn, pattern, repo=repos, regex=regex, ignore_case=ignore_case,
                               paths=paths, langs=langs, context=context, limit=limit,
                               timeout_ms=settings.statement_timeout_ms)
        except RepoindexError as exc:
            raise BadSearch(str(exc)) from None
    if found or as_json:
        emit([m.as_dict() for m in found], as_json, lambda: _print_matches(found, context))
    if found.truncated:
        click.echo(f"repoindex: showing the first {limit} matches; more exist (raise --limit,"
                   " up to 1000000, or narrow the pattern)", err=True)
        ctx.exit(4)
    if not found:
        ctx.exit(1)


def _print_matches(found: list[Any], context: int) -> None:
    """grep's layout: matches ``repo:path:N: text``, context ``repo:path-N- text``, ``--``
    between groups that do not touch; a window of a long line is marked with ``…``."""
    last: tuple[str, str, int] | None = None
    for m in found:
        first = m.line - len(m.before)
        if context and last is not None and \
                (last[:2] != (m.repo, m.path) or first > last[2] + 1):
            click.echo("--")
        for n, text in enumerate(m.before, start=first):
            if last is None or last[:2] != (m.repo, m.path) or n > last[2]:
                click.echo(f"{m.repo}:{m.path}-{n}- {text}")
        text = ("…" if m.offset > 1 else "") + m.text + ("…" if m.cut else "")
        click.echo(f"{m.repo}:{m.path}:{m.line}: {text}")
        for n, text in enumerate(m.after, start=m.line + 1):
            click.echo(f"{m.repo}:{m.path}-{n}- {text}")
        last = (m.repo, m.path, m.line + len(m.after))


@click.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or update the database schema (workers also do this on first use)."""
    from workers import db

    with db.connect(settings_of(ctx), autocommit=True) as conn:  # not connect(): it migrates
        applied = db.migrate(conn)
    click.echo("applied: " + (", ".join(applied) or "nothing, schema is current"))
