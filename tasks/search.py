"""Search of indexed content, defined as ``git grep -n`` defines it: line by line.

A substring search is ``git grep -F``; a regular expression (PostgreSQL ARE) is matched
against each line, ``^``/``$`` at line boundaries, nothing crossing a newline. The index
holds every line of every text blob as a row (``lines``, ops/migrations/008), with a
trigram index on the line (``lines_trgm``) that answers ``LIKE``/``ILIKE`` and ``~``/``~*``:
a pattern with trigrams reads the index and only the lines that match; one without
(``->``, ``^$``) reads the lines, never a blob. Patterns only ever travel as query
parameters, every query is planned with its own parameters (never a generic plan that
cannot see the trigrams), and a statement timeout bounds expensive ones.

Other services call :func:`search` with a psycopg connection of their own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from workers.errors import BadInput

WIDTH = 1000  # characters of a line returned; a longer line comes back as a window
MAX_LIMIT = 1_000_000
MAX_CONTEXT = 10


@dataclass(frozen=True)
class Match:
    """One matching line. ``text`` is the line, or for a line longer than ``WIDTH`` the
    window of it that starts at character ``offset`` (1-based) and holds the match
    (``cut`` is then true); ``column`` is the match's first character (1-based)."""

    repo: str
    path: str
    line: int
    text: str
    column: int = 1
    offset: int = 1
    cut: bool = False
    before: list[str] = field(default_factory=list)  # context lines (-C), nearest last
    after: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Matches(list[Match]):
    """The matches, in (repository, path, line) order; ``truncated`` when more exist
    than the limit let through."""

    truncated: bool = False


@dataclass(frozen=True)
class _Query:
    op: str
    needle: str
    column_sql: str


def like_pattern(text: str) -> str:
    """``%text%`` with LIKE's wildcards in ``text`` escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def glob_regex(glob: str) -> str:
    """A path glob as a PostgreSQL regex: ``*`` and ``?`` stay inside one directory,
    ``**`` crosses them, ``[...]`` is a class; a glob without ``/`` matches the file name
    at any depth (``*.py``), one with ``/`` the whole path (``lib/**/test_*``)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) != -1:
            body = glob[i + 1:end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    body = "".join(out)
    return f"^{body.lstrip('/')}$" if "/" in glob else f"(^|/){body}$"


def _query(pattern: str, regex: bool, ignore_case: bool) -> _Query:
    if regex:
        op = "~*" if ignore_case else "~"
        flags = "i" if ignore_case else ""
        return _Query(op, pattern, f"regexp_instr(l.line, %(needle)s, 1, 1, 0, '{flags}')")
    op = "ILIKE" if ignore_case else "LIKE"
    column = ("regexp_instr(l.line, %(literal)s, 1, 1, 0, 'iq')" if ignore_case
              else "strpos(l.line, %(literal)s)")
    return _Query(op, like_pattern(pattern), column)


def _filters(repos: Sequence[str], paths: Sequence[str], langs: Sequence[str]) -> str:
    sql = ""
    if repos:
        sql += " AND r.name = ANY(%(repos)s)"
    if paths:
        sql += " AND f.path ~ ANY(%(paths)s)"
    if langs:
        sql += " AND f.language = ANY(%(langs)s)"
    return sql


def sql(pattern: str, *, regex: bool = False, ignore_case: bool = False,
        repos: Sequence[str] = (), paths: Sequence[str] = (), langs: Sequence[str] = ()
        ) -> tuple[str, dict[str, Any]]:
    """The statement and parameters of a search (EXPLAIN it to see the plan)."""
    q = _query(pattern, regex, ignore_case)
    statement = (
        "SELECT r.name, f.path, l.n, l.sha, l.line, " + q.column_sql + " AS col"
        " FROM lines l JOIN files f ON f.sha = l.sha AND f.kind = 'text'"
        " JOIN repositories r ON r.id = f.repo_id"
        f" WHERE l.line {q.op} %(needle)s" + _filters(repos, paths, langs) +
        " ORDER BY r.name, f.path, l.n LIMIT %(limit)s"
    )
    params = {"needle": q.needle, "literal": pattern, "repos": list(repos),
              "paths": [glob_regex(g) for g in paths], "langs": list(langs), "limit": 1}
    return statement, params


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def search(conn: psycopg.Connection[Any], pattern: str, *,
           repo: str | Sequence[str] | None = None, regex: bool = False,
           ignore_case: bool = False, paths: Sequence[str] = (), langs: Sequence[str] = (),
           context: int = 0, limit: int = 50, timeout_ms: int = 5000) -> Matches:
    """Matching lines, ordered by repository, path and line number, at most ``limit``
    (``truncated`` says when more exist). ``repo``, ``paths`` (globs) and ``langs``
    (stored languages) each restrict to any of their values; ``context`` adds up to 10
    lines before and after each match."""
    if not pattern:
        raise BadInput("search pattern must not be empty")
    if not 1 <= limit <= MAX_LIMIT:
        raise BadInput(f"limit must be 1 to {MAX_LIMIT}")
    if not 0 <= context <= MAX_CONTEXT:
        raise BadInput(f"context must be 0 to {MAX_CONTEXT} lines")
    statement, params = sql(pattern, regex=regex, ignore_case=ignore_case,
                            repos=_names(repo), paths=paths, langs=langs)
    params["limit"] = limit + 1
    try:
        with conn.transaction():
            _settings(conn, timeout_ms)
            rows = conn.execute(statement, params, prepare=False).fetchall()
            lines = _context(conn, rows[:limit], context) if context else {}
    except psycopg.errors.InvalidRegularExpression as exc:
        message = str(exc.diag.message_primary).removeprefix("invalid regular expression: ")
        if message != "operation cancelled":  # the timeout, caught inside the regex engine
            raise BadInput(f"invalid regular expression: {message}") from None
        raise _too_slow(timeout_ms) from None
    except psycopg.errors.QueryCanceled:
        raise _too_slow(timeout_ms) from None
    found = Matches(_match(row, lines.get(row[3]), context) for row in rows[:limit])
    found.truncated = len(rows) > limit
    return found


def explain(conn: psycopg.Connection[Any], pattern: str, **options: Any) -> str:
    """The plan :func:`search` runs for ``pattern`` (same options, same settings)."""
    statement, params = sql(pattern, **options)
    params["limit"] = 51
    with conn.transaction():
        _settings(conn, 5000)
        return "\n".join(r[0] for r in conn.execute("EXPLAIN " + statement, params,
                                                    prepare=False))


def _settings(conn: psycopg.Connection[Any], timeout_ms: int) -> None:
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))


def _context(conn: psycopg.Connection[Any], rows: list[Any], context: int
             ) -> dict[str, list[str]]:
    """The lines of each blob that has a match (split once per blob)."""
    shas = sorted({row[3] for row in rows})
    cur = conn.execute("SELECT sha, string_to_array(content, E'\\n'), lines FROM blobs"
                       " WHERE sha = ANY(%s)", (shas,))
    return {sha: list(split[:count]) for sha, split, count in cur}


def _window(text: str, column: int) -> tuple[str, int, bool]:
    if len(text) <= WIDTH:
        return text, 1, False
    start = max(1, min(column - WIDTH // 4, len(text) - WIDTH + 1))
    return text[start - 1:start - 1 + WIDTH], start, True


def _match(row: Any, lines: list[str] | None, context: int) -> Match:
    repo, path, n, _sha, line, column = row
    text, offset, cut = _window(line, int(column) or 1)
    before = after = []
    if lines is not None:
        before = [ln[:WIDTH] for ln in lines[max(0, n - 1 - context):n - 1]]
        after = [ln[:WIDTH] for ln in lines[n:n + context]]
    return Match(repo, path, int(n), text, int(column) or 1, offset, cut, before, after)


def _too_slow(timeout_ms: int) -> BadInput:
    return BadInput(f"search took longer than {timeout_ms} ms; use a more specific pattern")
