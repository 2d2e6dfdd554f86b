"""SQL of the index: one transaction per operation, diffed against what is stored.

Locks (transaction-scoped advisory locks, so they vanish with the transaction whatever
ends it): ``(1, hashtext(name))`` makes operations on one repository run one at a time;
``(2, 0)`` is taken shared by indexing and exclusive by blob garbage collection, so a
blob is never deleted while an operation is about to reference it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tasks.classify import Content

Conn = psycopg.Connection[Any]
REPO_LOCK, GC_LOCK = 1, 2
SKIP_KINDS = ("binary", "too_large", "symlink", "submodule")


def lock_repository(conn: Conn, name: str) -> None:
    """Wait until no other operation holds ``name``; held until this transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (REPO_LOCK, name))


def lock_blobs(conn: Conn, *, exclusive: bool) -> None:
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    conn.execute(f"SELECT {fn}(%s, 0)", (GC_LOCK,))


def upsert_repository(conn: Conn, name: str, source: str, ref: str) -> int:
    row = conn.execute(
        "INSERT INTO repositories (name, source, ref) VALUES (%s, %s, %s) ON CONFLICT (name)"
        " DO UPDATE SET source = EXCLUDED.source, ref = EXCLUDED.ref RETURNING id",
        (name, source, ref)).fetchone()
    assert row is not None
    return int(row[0])


def load_tree(conn: Conn, rows: Iterable[tuple[str, str, int, int | None, str | None, str]]) -> int:
    """COPY (path, sha, mode, size, language, kind) rows into this transaction's ``tree``."""
    conn.execute("CREATE TEMP TABLE tree (path text PRIMARY KEY, sha text NOT NULL,"
                 " mode integer NOT NULL, size bigint, language text, kind text NOT NULL)"
                 " ON COMMIT DROP")
    count = 0
    with conn.cursor().copy("COPY tree FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    conn.execute("ANALYZE tree")
    return count


# A stored row is kept when the tree holds the same path, id and mode decided the same way
# (language, and kind: ``blob`` is stored as text or binary): after a change of the size
# limit or the classifier, the rows it decides differently are written again.
_SAME = ("{f}.path = {t}.path AND {f}.sha = {t}.sha AND {f}.mode = {t}.mode"
         " AND {f}.language IS NOT DISTINCT FROM {t}.language AND ({f}.kind = {t}.kind"
         " OR ({t}.kind = 'blob' AND {f}.kind IN ('text', 'binary')))")
_UNCHANGED = ("EXISTS (SELECT 1 FROM files f WHERE f.repo_id = %(repo)s AND "
              + _SAME.format(f="f", t="t") + ")")


def to_read(conn: Conn, repo_id: int) -> list[tuple[str, str]]:
    """(sha, kind) of the blobs this run must read: contents never stored, changed links."""
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT DISTINCT t.sha, t.kind FROM tree t WHERE NOT " + _UNCHANGED +
        " AND (t.kind = 'symlink' OR (t.kind = 'blob'"
        "      AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.sha = t.sha)))"
        " ORDER BY 1", {"repo": repo_id})]


@contextmanager
def blob_sink(conn: Conn) -> Iterator[BlobSink]:
    """A COPY stream into this transaction's ``new_blobs`` and ``new_links`` tables."""
    conn.execute("CREATE TEMP TABLE new_blobs (LIKE blobs) ON COMMIT DROP")
    conn.execute("CREATE TEMP TABLE new_links (sha text PRIMARY KEY, target text) ON COMMIT DROP")
    links: list[tuple[str, str]] = []
    with conn.cursor().copy("COPY new_blobs FROM STDIN") as copy:
        yield BlobSink(copy, links)
    with conn.cursor().copy("COPY new_links FROM STDIN") as copy:
        for row in links:
            copy.write_row(row)


class BlobSink:
    def __init__(self, copy: psycopg.Copy, links: list[tuple[str, str]]) -> None:
        self._copy = copy
        self._links = links

    def blob(self, sha: str, size: int, content: Content) -> None:
        self._copy.write_row((sha, size, content.binary, content.lines, content.lossy,
                              content.text))

    def link(self, sha: str, target: str) -> None:
        self._links.append((sha, target))


# the counts of a set of files rows ``x`` (kind, sha): rows, each skip reason, not UTF-8
_COUNTS = ("SELECT count(*), count(*) FILTER (WHERE x.kind = 'binary'),"
           " count(*) FILTER (WHERE x.kind = 'too_large'),"
           " count(*) FILTER (WHERE x.kind = 'symlink'),"
           " count(*) FILTER (WHERE x.kind = 'submodule'), count(*) FILTER (WHERE b.lossy)"
           " FROM x LEFT JOIN blobs b ON x.kind = 'text' AND b.sha = x.sha")
_INSERT = ("INSERT INTO files (repo_id, path, sha, mode, size, language, kind, target)"
           " SELECT %(repo)s, t.path, t.sha, t.mode, t.size, t.language,"
           "   CASE WHEN t.kind <> 'blob' THEN t.kind WHEN b.is_binary THEN 'binary'"
           "   ELSE 'text' END, l.target"
           " FROM tree t LEFT JOIN blobs b ON t.kind = 'blob' AND b.sha = t.sha"
           " LEFT JOIN new_links l ON t.kind = 'symlink' AND l.sha = t.sha"
           " WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.repo_id = %(repo)s"
           "   AND f.path = t.path)")


def _counted(conn: Conn, modify: str, params: dict[str, Any]) -> list[int]:
    row = conn.execute(f"WITH x AS ({modify}) {_COUNTS}", params).fetchone()
    assert row is not None
    return [int(v) for v in row]


def stored(conn: Conn, name: str) -> dict[str, Any] | None:
    """What the index of ``name`` holds and what decided it, or None (never indexed)."""
    row = conn.execute(
        "SELECT source, commit, files, max_file_bytes, max_files, classifier, skipped,"
        " not_utf8 FROM repositories WHERE name = %s", (name,)).fetchone()
    if row is None:
        return None
    return dict(zip(("source", "commit", "files", "max_file_bytes", "max_files", "classifier",
                     "skipped", "not_utf8"), row, strict=True))


# The rows of ``lines`` (search's, ops/migrations/008) of the blob rows ``{blobs}`` names,
# numbered as `git grep -n` numbers lines: split at \n only, no line after a final newline.
LINES_OF = ("SELECT b.sha, l.n, l.line FROM {blobs} b,"
            " unnest(string_to_array(b.content, E'\\n')) WITH ORDINALITY AS l(line, n)"
            " WHERE b.content IS NOT NULL AND l.n <= b.lines")
# The blobs this run read, and their lines: a blob another run stored meanwhile is
# skipped, lines and all.
_ADD_BLOBS = (
    "WITH added AS (INSERT INTO blobs SELECT * FROM new_blobs ON CONFLICT (sha) DO NOTHING"
    " RETURNING sha, content, lines) INSERT INTO lines " + LINES_OF.format(blobs="added"))
# Blobs (of those ``among`` selects) that no file references, deleted with their lines;
# the count of blobs deleted.
_DROP_BLOBS = (
    "WITH d AS (DELETE FROM blobs b {among} NOT EXISTS"
    " (SELECT 1 FROM files f WHERE f.sha = b.sha) RETURNING b.sha),"
    " l AS (DELETE FROM lines USING d WHERE lines.sha = d.sha) SELECT count(*) FROM d")


def apply(conn: Conn, repo_id: int, commit: str, job_id: str, decided: dict[str, Any]
          ) -> dict[str, Any]:
    """Make ``files`` of the repository equal ``tree``; return the counts of the run."""
    conn.execute(_ADD_BLOBS)
    removed = conn.execute(
        "DELETE FROM files f WHERE f.repo_id = %(repo)s AND NOT EXISTS (SELECT 1 FROM tree t"
        " WHERE " + _SAME.format(f="f", t="t") + ")", {"repo": repo_id}).rowcount
    written = conn.execute(_INSERT, {"repo": repo_id}).rowcount
    total, *kept = _counted(conn, "SELECT kind, sha FROM files WHERE repo_id = %(repo)s",
                            {"repo": repo_id})
    return _finish(conn, repo_id, commit, job_id, decided, total=total, written=written,
                   removed=removed, kept=kept)


def apply_changes(conn: Conn, repo_id: int, commit: str, job_id: str, decided: dict[str, Any],
                  paths: list[str], before: dict[str, Any]) -> dict[str, Any]:
    """Drop the rows at ``paths`` and add ``tree`` (the new side of those paths): the index
    of ``before['commit']`` becomes that of ``commit``. The counts are today's counts of
    the whole repository, kept up to date from the rows dropped and added."""
    conn.execute(_ADD_BLOBS)
    gone = _counted(conn, "DELETE FROM files WHERE repo_id = %(repo)s"
                          " AND path = ANY(%(paths)s::text[]) RETURNING kind, sha",
                    {"repo": repo_id, "paths": paths})
    new = _counted(conn, _INSERT + " RETURNING kind, sha", {"repo": repo_id})
    was = [before["files"], *(before["skipped"][k] for k in SKIP_KINDS), before["not_utf8"]]
    total, *kept = (w - g + n for w, g, n in zip(was, gone, new, strict=True))
    return _finish(conn, repo_id, commit, job_id, decided, total=total, written=new[0],
                   removed=gone[0], kept=kept)


def _finish(conn: Conn, repo_id: int, commit: str, job_id: str, decided: dict[str, Any], *,
            total: int, written: int, removed: int, kept: list[int]) -> dict[str, Any]:
    skipped = dict(zip(SKIP_KINDS, kept[:4], strict=True))
    conn.execute("UPDATE repositories SET commit = %s, files = %s, indexed_at = now(),"
                 " last_job_id = %s, max_file_bytes = %s, max_files = %s, classifier = %s,"
                 " skipped = %s, not_utf8 = %s WHERE id = %s",
                 (commit, total, job_id, decided["max_file_bytes"], decided["max_files"],
                  decided["classifier"], Jsonb(skipped), kept[4], repo_id))
    return {"files": total, "indexed": written, "removed": removed,
            "unchanged": total - written, "skipped": skipped, "not_utf8": kept[4]}


def touch(conn: Conn, repo_id: int, job_id: str, before: dict[str, Any]) -> dict[str, Any]:
    """Nothing to do: the stored index is the commit's; only the run is recorded."""
    conn.execute("UPDATE repositories SET indexed_at = now(), last_job_id = %s WHERE id = %s",
                 (job_id, repo_id))
    return {"files": before["files"], "indexed": 0, "removed": 0, "unchanged": before["files"],
            "skipped": {k: int(before["skipped"][k]) for k in SKIP_KINDS},
            "not_utf8": before["not_utf8"]}


def delete_repository(conn: Conn, name: str) -> dict[str, Any]:
    """Remove a repository, its files, and the blobs no other repository references."""
    lock_repository(conn, name)
    row = conn.execute("SELECT id, files FROM repositories WHERE name = %s", (name,)).fetchone()
    if row is None:
        return {"repository": name, "deleted": False, "files": 0, "blobs": 0}
    conn.execute("CREATE TEMP TABLE gone ON COMMIT DROP AS"
                 " SELECT DISTINCT sha FROM files WHERE repo_id = %s", (row[0],))
    conn.execute("DELETE FROM repositories WHERE id = %s", (row[0],))
    lock_blobs(conn, exclusive=True)
    blobs = _count(conn, _DROP_BLOBS.format(among="USING gone g WHERE b.sha = g.sha AND"))
    return {"repository": name, "deleted": True, "files": int(row[1]), "blobs": blobs}


def collect_garbage(conn: Conn) -> dict[str, Any]:
    """Delete blobs no file references any more (left behind by re-indexing)."""
    lock_blobs(conn, exclusive=True)
    return {"blobs": _count(conn, _DROP_BLOBS.format(among="WHERE"))}


def _count(conn: Conn, statement: str) -> int:
    row = conn.execute(statement).fetchone()
    return int(row[0]) if row else 0


# autovacuum's own rule for when a table needs ANALYZE (threshold + scale factor * rows),
# applied by the product: a server may run with autovacuum off, and a table nobody
# analyzed is planned as if empty (search would read every line, never the trigram index)
ANALYZE_THRESHOLD, ANALYZE_SCALE = 50, 0.1


def keep_statistics(conn: Conn, changed: int) -> list[str]:
    """ANALYZE ``blobs`` and ``files`` where rows changed since their last analysis (this
    operation's ``changed`` included: its counts reach the statistics a moment later)
    exceed autovacuum's threshold, and ``lines`` with ``blobs`` (written together);
    outside the operation's transaction. Returns them."""
    rows = conn.execute(
        "SELECT c.relname, s.n_mod_since_analyze, c.reltuples FROM pg_class c"
        " JOIN pg_stat_user_tables s ON s.relid = c.oid"
        " WHERE c.oid IN ('blobs'::regclass, 'files'::regclass)").fetchall()
    stale = [name for name, mods, tuples in rows
             if mods + changed > ANALYZE_THRESHOLD + ANALYZE_SCALE * max(float(tuples), 0.0)]
    stale += ["lines"] if "blobs" in stale else []
    for name in stale:
        conn.execute(f"ANALYZE {name}")
    conn.commit()
    return stale


def flush_search_index(conn: Conn) -> None:
    """Move the trigram index's pending list (GIN fastupdate: up to 4 MB of entries every
    search must scan one by one) into the index proper, after an operation added blobs: a
    search for a rare literal then reads a few index pages instead of the list. Only
    VACUUM and autoanalyze do it otherwise, and autovacuum may be off."""
    try:
        conn.execute("SELECT gin_clean_pending_list('lines_trgm'::regclass)")
        conn.commit()
    except psycopg.errors.InsufficientPrivilege:  # not the owner: VACUUM will do it
        conn.rollback()


def repositories(conn: Conn) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT name, source, commit, files, indexed_at FROM repositories"
                       " ORDER BY name")
    return [{"name": r[0], "source": r[1], "commit": r[2], "files": r[3],
             "indexed_at": r[4].isoformat() if r[4] else None} for r in cur]
