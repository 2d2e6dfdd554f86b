"""The run ledger: one row per attempt of every operation, written outside its transaction.

An attempt's row is inserted as ``running`` before the operation's scope opens and
updated when it ends (``succeeded``, ``failed`` or ``interrupted`` by shutdown). When the
same job is delivered again while a row is still ``running``, the row's process is asked
after: on this host by its pid, elsewhere by its replica's lease (``workers.recovery``).
A live one is waited for and its outcome is this delivery's too; a dead one (SIGKILL, OOM,
a replica gone) is marked ``lost``, and a job lost ``max_lost`` times is failed.

An attempt judged lost may still be alive (a replica cut off past its lease that comes
back): ``fence`` refuses, in the operation's own transaction, to let it commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import psutil
import psycopg
from celery.exceptions import Retry

from workers.errors import BadInput, LimitExceeded, RepoindexError, Revoked
from workers.resources import CleanupReport, outcome_of
from workers.scrub import scrub

log = logging.getLogger("repoindex.ledger")
LOST_ERROR = "worker process died during the operation (SIGKILL or out of memory)"


@dataclass(frozen=True)
class Run:
    id: int
    job_id: str
    attempt: int
    # set when an earlier attempt of the same job already succeeded (its result): a
    # message redelivered after its operation committed but before it was acknowledged
    completed: dict[str, Any] | None = None


JOB_LOCK = 0x6A6F6273  # "jobs": with hashtext(job id), serialises the starts of one job
WAIT_SECONDS = 0.25    # how often a copy waiting for a live copy of its job looks again

# Ledger rows are bookkeeping beside the operation's own (durable) transaction: their
# commits need not wait for the WAL flush (an fsync, ~1-2 ms, twice per operation). A
# server crash can lose the last few ms of ledger rows, never index data; a job whose
# 'succeeded' row was lost and is redelivered re-runs as a no-op re-index.
_ASYNC_COMMIT = "SELECT set_config('synchronous_commit', 'off', true)"
_ROWS = ("SELECT id, attempt, state, worker, pid, node, extract(epoch FROM started_at),"
         " counts, NULL, repository, args_hash FROM runs WHERE job_id = %s ORDER BY id")
_INSERT = ("INSERT INTO runs (job_id, task, repository, attempt, worker, pid, node, state,"
           " error, args_hash, finished_at) VALUES (%(job)s, %(task)s, %(repository)s,"
           " %(attempt)s, %(worker)s, %(pid)s, %(node)s, %(state)s, %(error)s, %(args)s,"
           " CASE WHEN %(state)s = 'running' THEN NULL ELSE now() END) RETURNING id")

_INSERT_FIRST = ("INSERT INTO runs (job_id, task, attempt, worker, pid, node, state, args_hash)"
                 " SELECT %(job)s, %(task)s, 1, %(worker)s, %(pid)s, %(node)s, 'running',"
                 " %(args)s WHERE NOT EXISTS (SELECT 1 FROM runs WHERE job_id = %(job)s)"
                 " RETURNING id")


@dataclass(frozen=True)
class Attempt:
    """A ``running`` row, as the liveness check sees it."""

    host: str | None
    pid: int | None
    node: str | None
    started: float  # epoch seconds


Liveness = Callable[[Attempt], bool | None]


class AlreadyFailed(RepoindexError):
    """A copy of this job ran at the same time and failed: its error is this job's."""


class Superseded(RepoindexError):
    """Fenced: this attempt's work must not be committed (see ``fence``)."""


# The attempt this process is running (set by ``start``, cleared by ``finish``): what
# ``fence`` checks. None outside an operation (the indexer called directly).
_current: ContextVar[Run | None] = ContextVar("repoindex_run", default=None)
_FENCE = ("SELECT me.state, w.job_id, r.commit FROM runs me"
          " LEFT JOIN repositories r ON r.name = %(repo)s"
          " LEFT JOIN LATERAL (SELECT w.job_id FROM runs w WHERE w.job_id = r.last_job_id"
          "   AND w.job_id <> me.job_id AND w.state IN ('running', 'succeeded')"
          "   AND w.started_at > me.started_at LIMIT 1) w ON true"
          " WHERE me.id = %(id)s FOR SHARE OF me")


def fence(conn: psycopg.Connection[Any], *, repository: str, commit: str) -> None:
    """In the operation's transaction, before it writes the index: raise ``Superseded``
    (the transaction then rolls back) when this attempt is no longer the job's live one
    (its row was marked ``lost``: its replica was judged gone and the job ran again), or
    when the stored index of ``repository`` is newer work (written by a job whose attempt
    started after this one, at another commit). The row stays locked (``FOR SHARE``) until
    the commit, so no copy can mark it lost in between."""
    run = _current.get()
    if run is None:
        return
    row = conn.execute(_FENCE, {"repo": repository, "id": run.id}).fetchone()
    state, newer, stored = row if row is not None else ("missing", None, None)
    if state != "running":
        raise Superseded(
            f"attempt {run.attempt} of job {run.job_id} is '{state}' in the run ledger: it"
            " was judged lost while it ran (its replica cut off past its lease) and the job"
            f" ran again elsewhere; its index of {repository} is rolled back, not committed")
    if newer is not None and stored != commit:
        raise Superseded(
            f"repository {repository} holds newer work: job {newer}, which started after"
            f" this one, indexed it at {stored}; this job's index at {commit} is rolled"
            " back, not committed over it")


def args_hash(task: str, args: Any, kwargs: Any) -> str:
    """What makes two sends of one job id the same job: task name and arguments."""
    doc = json.dumps([task, list(args), kwargs], sort_keys=True, default=repr)
    return hashlib.sha256(doc.encode()).hexdigest()


def start(conn: psycopg.Connection[Any], *, job_id: str, task: str, max_lost: int,
          node: str = "", alive: Liveness | None = None, args: str | None = None) -> Run:
    """Record a new attempt; hand back the result of one that already succeeded; refuse a
    job that has killed its worker ``max_lost`` times. A new attempt is this process's
    current one (``fence``) until ``finish``."""
    _current.set(None)
    run = _start(conn, job_id=job_id, task=task, max_lost=max_lost, node=node,
                 alive=alive or same_host_alive, args=args)
    _current.set(run if run.completed is None else None)
    return run


def _start(conn: psycopg.Connection[Any], *, job_id: str, task: str, max_lost: int,
           node: str, alive: Liveness, args: str | None) -> Run:
    """Copies of one job (a redelivery, a job recovered from a replica judged gone) are
    serialised by a transaction lock on the job id. A copy that finds a ``running`` attempt
    asks ``alive`` about it: a live one is waited for, and its outcome becomes this copy's
    (succeeded: its result; failed: its error); a dead one is marked ``lost``.
    """
    fast = {"job": job_id, "task": task, "worker": socket.gethostname(), "pid": os.getpid(),
           "node": node or None, "args": args}
    # The first delivery of a job, by far the common case: one round trip (the insert
    # happens only when the job has no row yet, under the job's lock).
    with conn.pipeline():
        conn.execute(_ASYNC_COMMIT)
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (JOB_LOCK, job_id))
        first = conn.execute(_INSERT_FIRST, fast)
        conn.commit()
    inserted = first.fetchone()
    if inserted is not None:
        return Run(int(inserted[0]), job_id, 1)
    while True:
        with conn.pipeline():
            conn.execute(_ASYNC_COMMIT)
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (JOB_LOCK, job_id))
            cur = conn.execute(_ROWS, (job_id,))
        rows = cur.fetchall()
        earlier = next((r[10] for r in rows if r[10]), None)
        if args and earlier and earlier != args:
            refused = (f"job id {job_id} was already used with different arguments; the"
                       " earlier job is kept: send this one with a new id")
            conn.execute(_INSERT, {**fast, "attempt": len(rows) + 1, "repository": None,
                                   "state": "failed", "error": refused})
            conn.commit()
            raise BadInput(refused)
        done = next((r for r in rows if r[2] == "succeeded"), None)
        if done is not None:  # rare: a redelivery after the operation committed
            conn.commit()
            return Run(int(done[0]), job_id, int(done[1]), completed=done[7] or {})
        running = [r for r in rows if r[2] == "running"]
        if any(alive(Attempt(r[3], r[4], r[5], float(r[6]))) for r in running):
            conn.commit()  # releases the lock: the live copy may finish meanwhile
            log.info("job %s is running in another live process: waiting for its outcome",
                     job_id)
            failed = _wait(conn, [int(r[0]) for r in running], alive)
            if failed is not None:
                raise AlreadyFailed(failed)
            continue  # decide again: it succeeded (its result), or was lost/interrupted
        if running:
            conn.execute("UPDATE runs SET state = 'lost', finished_at = now(), error = %s"
                         " WHERE id = ANY(%s)", (LOST_ERROR, [int(r[0]) for r in running]))
        lost = sum(r[2] == "lost" for r in rows) + len(running)
        failing = lost >= max_lost
        error = f"{LOST_ERROR}, {lost} times; not retried" if failing else None
        row = conn.execute(_INSERT, {
            **fast, "attempt": len(rows) + 1,
            "repository": max((r[9] for r in rows if r[9]), default=None),
            "state": "failed" if failing else "running", "error": error}).fetchone()
        conn.commit()
        assert row is not None
        if failing:
            raise LimitExceeded(error or "")
        return Run(int(row[0]), job_id, len(rows) + 1)


def _wait(conn: psycopg.Connection[Any], ids: list[int], alive: Liveness) -> str | None:
    """Wait until none of the attempts ``ids`` is both running and alive; return the error
    of one that failed, if any."""
    while True:
        time.sleep(WAIT_SECONDS)
        rows = conn.execute("SELECT state, error, worker, pid, node,"
                            " extract(epoch FROM started_at) FROM runs WHERE id = ANY(%s)",
                            (ids,)).fetchall()
        conn.commit()
        failed = [r[1] or "failed" for r in rows if r[0] == "failed"]
        if failed:
            return failed[0]
        if not any(r[0] == "running" and alive(Attempt(r[2], r[3], r[4], float(r[5])))
                   for r in rows):
            return None


def same_host_alive(attempt: Attempt) -> bool | None:
    """On this host: is the attempt's process alive? None when it ran on another host."""
    if attempt.host != socket.gethostname() or attempt.pid is None:
        return None
    try:
        return psutil.Process(attempt.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def finish(conn: psycopg.Connection[Any], run: Run, *, repository: str,
           result: Any, error: BaseException | None, cleanup: CleanupReport | None) -> bool:
    """Close the attempt's row with its outcome, counts, error text and cleanup report;
    False when the row had been marked lost meanwhile (its outcome is then not recorded:
    another copy of the job answers for it)."""
    _current.set(None)
    state = state_of(error)
    counts = result if isinstance(result, dict) else None
    with conn.pipeline():  # one round trip, synced by the commit
        conn.execute(_ASYNC_COMMIT)
        cur = conn.execute(
            "UPDATE runs SET state = %s, finished_at = now(),"
            " repository = coalesce(%s, repository), counts = %s, error = %s, cleanup = %s"
            " WHERE id = %s AND state = 'running'",
            (state, repository or None, json.dumps(counts) if counts is not None else None,
             error_text(error), json.dumps(cleanup.as_dict()) if cleanup else None, run.id))
        conn.commit()
    if cur.rowcount == 0:
        log.warning("attempt %d of %s was judged lost while it ran (its replica's lease"
                    " lapsed); its outcome %s is not recorded over the ledger's", run.attempt,
                    run.job_id, state)
    return bool(cur.rowcount)


def state_of(error: BaseException | None) -> str:
    """succeeded, failed, interrupted (shutdown) or retried: the ledger's and the metrics'."""
    return "retried" if isinstance(error, Retry) else outcome_of(error)


def error_text(error: BaseException | None) -> str | None:
    """One line a caller can read: the message of our errors, type and message otherwise."""
    if error is None:
        return None
    if isinstance(error, SystemExit | KeyboardInterrupt):
        return "interrupted by worker shutdown; the job was returned to the queue"
    if isinstance(error, Revoked):
        return "revoked while it ran (revoke terminate=True); rolled back"
    if isinstance(error, Retry):
        cause = error.exc if isinstance(error.exc, BaseException) else None
        return scrub(f"retrying after: {error_text(cause) or error}")[:1000]
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    line = text if isinstance(error, RepoindexError) else f"{name}: {text}" if text else name
    return scrub(line)[:1000]
