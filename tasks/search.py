"""Search of indexed content: substring (trigram index) or PostgreSQL regular expression.

Patterns only ever travel as query parameters; a statement timeout bounds expensive ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from workers.errors import BadInput

MAX_LINE = 1000


@dataclass(frozen=True)
class Match:
    repo: str
    path: str
    line: int
    text: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def like_pattern(text: str) -> str:
    """``%text%`` with LIKE's wildcards in ``text`` escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search(conn: psycopg.Connection[Any], pattern: str, *, repo: str | None = None,
           regex: bool = False, limit: int = 50, timeout_ms: int = 5000) -> list[Match]:
    """Matching lines, ordered by repository, path and line number."""
    if not pattern:
        raise BadInput("search pattern must not be empty")
    if limit < 1:
        raise BadInput("limit must be at least 1")
    op, needle = ("~", pattern) if regex else ("LIKE", like_pattern(pattern))
    sql = (
        "SELECT r.name, f.path, l.n, left(l.line, %(max)s)"
        " FROM blobs b JOIN files f ON f.sha = b.sha AND f.kind = 'text'"
        " JOIN repositories r ON r.id = f.repo_id,"
        " LATERAL unnest(string_to_array(b.content, E'\\n')) WITH ORDINALITY AS l(line, n)"
        f" WHERE b.content {op} %(needle)s AND l.line {op} %(needle)s"
        " AND (%(repo)s::text IS NULL OR r.name = %(repo)s)"
        " ORDER BY r.name, f.path, l.n LIMIT %(limit)s"
    )
    params = {"max": MAX_LINE, "needle": needle, "repo": repo, "limit": limit}
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
            rows = conn.execute(sql, params).fetchall()
    except psycopg.errors.InvalidRegularExpression as exc:
        raise BadInput(f"invalid regular expression: {exc.diag.message_primary}") from None
    except psycopg.errors.QueryCanceled:
        raise BadInput(f"search took longer than {timeout_ms} ms; use a more specific "
                       "pattern") from None
    return [Match(r[0], r[1], int(r[2]), r[3]) for r in rows]
