"""The run ledger: one row per attempt of every operation, written outside its transaction.

An attempt's row is inserted as ``running`` before the operation's scope opens and
updated when it ends (``succeeded``, ``failed`` or ``interrupted`` by shutdown). A row
still ``running`` when the same job is delivered again belonged to a process that died
(SIGKILL, OOM): it is marked ``lost``, and a job lost ``max_lost`` times is failed.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import psycopg
from celery.exceptions import Retry

from workers.errors import LimitExceeded, RepoindexError
from workers.resources import CleanupReport, outcome_of
from workers.scrub import scrub

LOST_ERROR = "worker process died during the operation (SIGKILL or out of memory)"


@dataclass(frozen=True)
class Run:
    id: int
    job_id: str
    attempt: int
    # set when an earlier attempt of the same job already succeeded (its result): a
    # message redelivered after its operation committed but before it was acknowledged
    completed: dict[str, Any] | None = None


_START = """
WITH already AS (
    SELECT EXISTS (SELECT 1 FROM runs WHERE job_id = %(job)s AND state = 'succeeded') AS done
), lost AS (
    UPDATE runs SET state = 'lost', finished_at = now(), error = %(lost_error)s
    WHERE job_id = %(job)s AND state = 'running' AND NOT (SELECT done FROM already)
    RETURNING 1
), prev AS (  -- the statement's snapshot: rows being marked lost above still look running
    SELECT count(*) AS n, count(*) FILTER (WHERE state = 'lost') AS lost,
           max(repository) AS repository
    FROM runs WHERE job_id = %(job)s
), decided AS (
    SELECT n, lost + (SELECT count(*) FROM lost) AS lost, repository FROM prev
)
INSERT INTO runs (job_id, task, repository, attempt, worker, pid, state, error, finished_at)
SELECT %(job)s, %(task)s, repository, n + 1, %(worker)s, %(pid)s,
       CASE WHEN lost >= %(max_lost)s THEN 'failed' ELSE 'running' END,
       CASE WHEN lost >= %(max_lost)s
            THEN %(lost_error)s || ', ' || lost || ' times; not retried' END,
       CASE WHEN lost >= %(max_lost)s THEN now() END
FROM decided WHERE NOT (SELECT done FROM already)
RETURNING id, attempt, error
"""
_DONE = ("SELECT id, attempt, counts FROM runs WHERE job_id = %s AND state = 'succeeded'"
         " ORDER BY id LIMIT 1")


# Ledger rows are bookkeeping beside the operation's own (durable) transaction: their
# commits need not wait for the WAL flush (an fsync, ~1-2 ms, twice per operation). A
# server crash can lose the last few ms of ledger rows, never index data; a job whose
# 'succeeded' row was lost and is redelivered re-runs as a no-op re-index.
_ASYNC_COMMIT = "SELECT set_config('synchronous_commit', 'off', true)"


def start(conn: psycopg.Connection[Any], *, job_id: str, task: str, max_lost: int) -> Run:
    """Record a new attempt (one statement, one round trip); refuse a job that has killed
    its worker ``max_lost`` times; hand back the result of one that already succeeded."""
    with conn.pipeline():
        conn.execute(_ASYNC_COMMIT)
        cur = conn.execute(_START, {"job": job_id, "task": task, "worker": socket.gethostname(),
                                    "pid": os.getpid(), "max_lost": max_lost,
                                    "lost_error": LOST_ERROR})
        conn.commit()
    row = cur.fetchone()
    if row is None:  # nothing inserted: an earlier attempt succeeded (rare: a redelivery)
        done = conn.execute(_DONE, (job_id,)).fetchone()
        conn.commit()
        assert done is not None
        return Run(int(done[0]), job_id, int(done[1]), completed=done[2] or {})
    if row[2] is not None:
        raise LimitExceeded(row[2])
    return Run(int(row[0]), job_id, int(row[1]))


def finish(conn: psycopg.Connection[Any], run: Run, *, repository: str,
           result: Any, error: BaseException | None, cleanup: CleanupReport | None) -> None:
    """Close the attempt's row with its outcome, counts, error text and cleanup report."""
    state = state_of(error)
    counts = result if isinstance(result, dict) else None
    with conn.pipeline():  # one round trip, synced by the commit
        conn.execute(_ASYNC_COMMIT)
        conn.execute(
            "UPDATE runs SET state = %s, finished_at = now(),"
            " repository = coalesce(%s, repository), counts = %s, error = %s, cleanup = %s"
            " WHERE id = %s",
            (state, repository or None, json.dumps(counts) if counts is not None else None,
             error_text(error), json.dumps(cleanup.as_dict()) if cleanup else None, run.id))
        conn.commit()


def state_of(error: BaseException | None) -> str:
    """succeeded, failed, interrupted (shutdown) or retried: the ledger's and the metrics'."""
    return "retried" if isinstance(error, Retry) else outcome_of(error)


def error_text(error: BaseException | None) -> str | None:
    """One line a caller can read: the message of our errors, type and message otherwise."""
    if error is None:
        return None
    if isinstance(error, SystemExit | KeyboardInterrupt):
        return "interrupted by worker shutdown; the job was returned to the queue"
    if isinstance(error, Retry):
        cause = error.exc if isinstance(error.exc, BaseException) else None
        return scrub(f"retrying after: {error_text(cause) or error}")[:1000]
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    line = text if isinstance(error, RepoindexError) else f"{name}: {text}" if text else name
    return scrub(line)[:1000]
