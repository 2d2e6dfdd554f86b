"""Indexing and deleting repositories: plain functions over a resource scope.

Nothing here imports Celery. Each operation uses the connection and processes its scope
gives it, inside one transaction: readers keep seeing the previous complete index until
it commits, and an interrupted operation leaves nothing behind.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from tasks import gitdiff, reindex, store
from tasks.classify import classify, decode_path, language
from tasks.git import MODE_SUBMODULE, MODE_SYMLINK, SYMLINK_MAX, Git, TreeEntry, git_env
from tasks.validate import IndexArgs
from workers import ledger, logs
from workers.errors import LimitExceeded
from workers.resources import ResourceManager
from workers.scrub import scrub
from workers.settings import Settings

Progress = Callable[..., None]  # (done, total, phase)
# A btree index entry holds at most ~2,700 bytes (files' and tree's primary keys): a
# longer path is refused by name before anything is written, not by the server mid-COPY
MAX_PATH_BYTES = 2048


def _no_progress(done: int, total: int, phase: str = "") -> None:
    return None


# The phases of an index operation, in order, each reported with its own done/total.
PHASES = ("reading tree", "reading blobs", "storing", "commit", "indexing")


def tree_rows(entries: Iterator[TreeEntry], *, max_files: int, max_bytes: int
              ) -> Iterator[tuple[str, str, int, int | None, str | None, str]]:
    """Rows of the ``tree`` table: (path, sha, mode, size, language, kind)."""
    for count, entry in enumerate(entries, start=1):
        if count > max_files:
            raise LimitExceeded(f"repository has more than {max_files} files "
                                "(REPOINDEX_MAX_FILES)")
        path = decode_path(entry.path)
        if len(path.encode()) > MAX_PATH_BYTES:
            raise LimitExceeded(f"path {path[:60]!r}... is {len(path.encode())} bytes long; "
                                f"the index holds paths of up to {MAX_PATH_BYTES} bytes")
        if entry.mode == MODE_SUBMODULE:
            kind = "submodule"
        elif entry.mode == MODE_SYMLINK:
            # a target no file system would accept is never read (nor held in memory)
            kind = "symlink" if (entry.size or 0) <= SYMLINK_MAX else "too_large"
        elif entry.size is not None and entry.size > max_bytes:
            kind = "too_large"
        else:
            kind = "blob"
        yield path, entry.sha, entry.mode, entry.size, language(path.rsplit("/", 1)[-1]), kind


def open_source(rm: ResourceManager, args: IndexArgs, settings: Settings) -> Git:
    if args.source.path is not None:
        return Git.open_local(rm, args.source.path, settings.git_timeout, settings.roots)
    assert args.source.url is not None
    return Git.clone(rm, args.source.url, settings.git_timeout)


def index_repository(rm: ResourceManager, settings: Settings, args: IndexArgs, *,
                     job_id: str, progress: Progress = _no_progress) -> dict[str, Any]:
    """Index ``args.source`` at ``args.ref`` under ``args.name``; returns the run summary:
    the counts, and which way it went (``strategy``, ``reason``: tasks.reindex)."""
    started = time.perf_counter()
    rm.repo = args.name
    logs.bind(repo=args.name)
    git = open_source(rm, args, settings)
    commit = git.resolve(args.ref)
    source, now = scrub(args.source.text), reindex.decided(settings)
    conn = rm.connection()
    read = read_bytes = 0
    with conn.transaction():
        store.lock_repository(conn, args.name)
        store.lock_blobs(conn, exclusive=False)
        before = store.stored(conn, args.name)
        repo_id = store.upsert_repository(conn, args.name, source, args.ref)
        plan = reindex.plan(git, before, commit, source, now)
        if plan.strategy == reindex.UNCHANGED:
            assert before is not None
            ledger.fence(conn, repository=args.name, commit=commit)  # see below
            counts = store.touch(conn, repo_id, job_id, before)
        else:
            changes = (gitdiff.changes(git, before["commit"], commit)
                       if plan.strategy == reindex.DELTA and before else None)
            progress(0, 0, "reading tree")  # the total is known once the tree has been read
            entries = store.load_tree(conn, tree_rows(
                git.ls_tree(commit) if changes is None else iter(changes.added),
                max_files=settings.max_files, max_bytes=settings.max_file_bytes))
            progress(entries, entries, "reading tree")
            read, read_bytes = _read_blobs(conn, git, repo_id, settings, progress)
            progress(0, entries, "storing")
            # a stale attempt (judged lost while cut off, or older than the stored index)
            # must not write over newer work: refused here, so the transaction rolls back
            ledger.fence(conn, repository=args.name, commit=commit)
            if changes is None:
                counts = store.apply(conn, repo_id, commit, job_id, now)
            else:
                assert before is not None
                counts = store.apply_changes(conn, repo_id, commit, job_id, now,
                                             [decode_path(p) for p in changes.paths], before)
                if counts["files"] > settings.max_files:  # as the full path would refuse it
                    raise LimitExceeded(f"repository has more than {settings.max_files} "
                                        "files (REPOINDEX_MAX_FILES)")
            progress(entries, entries, "storing")
            progress(0, 1, "commit")
    changed = counts["indexed"] + counts["removed"]
    if plan.strategy != reindex.UNCHANGED:
        progress(1, 1, "commit")
        progress(0, changed, "indexing")  # planner statistics and the trigram index's backlog
        if changed:
            store.keep_statistics(conn, changed + read)
        if read:
            store.flush_search_index(conn)
        progress(changed, changed, "indexing")
    rm.release(conn)
    return {"repository": args.name, "commit": commit, **counts, "read": read,
            "bytes": read_bytes, "strategy": plan.strategy, "reason": plan.reason,
            "seconds": round(time.perf_counter() - started, 3), "git_peak_rss": git_peak_rss()}


def _read_blobs(conn: store.Conn, git: Git, repo_id: int, settings: Settings,
                progress: Progress) -> tuple[int, int]:
    """Read the blobs ``tree`` needs into the blob sink; (blobs read, bytes read)."""
    wanted = store.to_read(conn, repo_id)
    kinds, read_bytes = dict(wanted), 0
    progress(0, len(wanted), "reading blobs")
    with store.blob_sink(conn) as sink:
        blobs = git.read_blobs((s for s, _ in wanted),
                               max_bytes=max(settings.max_file_bytes, SYMLINK_MAX))
        for done, (sha, data) in enumerate(blobs, start=1):
            read_bytes += len(data)
            if kinds[sha] == "symlink":
                sink.link(sha, decode_path(data))
            else:
                sink.blob(sha, len(data), classify(data))
            progress(done, len(wanted), "reading blobs")
    return len(wanted), read_bytes  # the per-run lists go now; the lifecycle trims after


def git_peak_rss() -> int:
    """Largest peak RSS of any git process this worker child has reaped, in bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def delete_repository(rm: ResourceManager, name: str) -> dict[str, Any]:
    rm.repo = name
    logs.bind(repo=name)
    conn = rm.connection()
    with conn.transaction():
        result = store.delete_repository(conn, name)
    if result["deleted"]:
        store.keep_statistics(conn, result["files"] + result["blobs"])
    rm.release(conn)
    return result


def canary(rm: ResourceManager, settings: Settings, *, job_id: str, seconds: float
           ) -> dict[str, Any]:
    """Hold one of each resource for ``seconds`` inside a transaction, then commit a row.

    A diagnostic operation: an interrupted canary must leave no row, no temp file, no git
    process and no open transaction behind (``repoindex bench shutdown`` counts them).
    """
    started = time.perf_counter()
    marker = rm.temp_path("canary")
    marker.write_text(job_id)
    git = rm.popen(["git", "cat-file", "--batch"], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=git_env())
    conn = rm.connection()
    with conn.transaction():
        conn.execute("INSERT INTO canary (job_id) VALUES (%s) ON CONFLICT DO NOTHING", (job_id,))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    rm.release(conn)
    rm.release(git)
    return {"job": job_id, "seconds": round(time.perf_counter() - started, 3)}


def collect_garbage(rm: ResourceManager) -> dict[str, Any]:
    conn = rm.connection()
    with conn.transaction():
        result = store.collect_garbage(conn)
    if result["blobs"]:
        store.keep_statistics(conn, result["blobs"])
    rm.release(conn)
    return result
