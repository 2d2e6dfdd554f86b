"""Commands on jobs, through the broker and the result backend: enqueue, status, delete."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from cli.common import emit, long_running, settings_of
from workers.settings import Settings

JOB_STATES_DONE = ("SUCCESS", "FAILURE", "REVOKED")

# Exit statuses of the job commands (README "CLI"; 3, Redis unreachable, is cli.__init__'s).
EXIT_FAILED = 1      # the job failed or was revoked; delete: no such repository
EXIT_UNKNOWN = 2     # no job has this id (usage errors are 2 too, as click makes them)
EXIT_NOT_DONE = 5    # still queued or running when we stopped waiting (or at `status`)

_FETCH_GAP = 0.05    # seconds a fetched message may be in neither a queue nor ``unacked``

# Where a message of a job id waits in Redis: a queue (kombu keeps one list per priority
# step, "<queue>\x06\x16<n>") or the ``unacked`` hash (taken by a worker, not acknowledged).
# Scanned inside Redis, in chunks, for the envelope's ``"id": "<job id>"`` header.
_FIND_MESSAGE = """
local needle = '"id": "' .. ARGV[1] .. '"'
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'list' then
    local n, start = redis.call('LLEN', key), 0
    while start < n do
      for _, m in ipairs(redis.call('LRANGE', key, start, start + 999)) do
        if string.find(m, needle, 1, true) then return i end
      end
      start = start + 1000
    end
  elseif kind == 'hash' then
    for _, m in ipairs(redis.call('HVALS', key)) do
      if string.find(m, needle, 1, true) then return i end
    end
  end
end
return 0
"""


def job_status(job_id: str, settings: Settings) -> dict[str, Any]:
    """``{"id", "state", "result" | "error" | "progress"}`` from the result backend; when it
    has nothing, from the broker's queues (a queued job: no database needed), then from the
    run ledger (a result the backend no longer keeps): ``UNKNOWN`` when none of the three
    knows the id. A queued job costs two Redis reads, so waiting polls no database."""
    from celery.result import AsyncResult

    from workers.client import client

    res: AsyncResult[Any] = AsyncResult(job_id, app=client())
    doc = _backend_status(res)
    if doc["state"] != "PENDING":
        return doc
    looked = time.monotonic()
    where = _in_broker(job_id)
    if where is not None:
        return {**doc, "broker": where}
    doc.update(_ledger_status(job_id, settings))
    if doc["state"] == "PENDING":
        # A worker's fetch takes the message off the queue (BRPOP) a moment before it records
        # it in ``unacked``: look again once that moment has passed. Reaching the ledger
        # usually took longer already, so this rarely sleeps at all.
        time.sleep(max(0.0, _FETCH_GAP - (time.monotonic() - looked)))
        doc = _backend_status(res)
        where = _in_broker(job_id) if doc["state"] == "PENDING" else None
        if doc["state"] == "PENDING":
            doc.update({"broker": where} if where else {"state": "UNKNOWN"})
    return doc


def _backend_status(res: Any) -> dict[str, Any]:
    """The backend's record in one read (``AsyncResult.state`` and ``.info`` are a read
    each, so a phase could be paired with another phase's done/total)."""
    meta = res.backend.get_task_meta(res.id)
    state, info = str(meta["status"]), meta.get("result")
    doc: dict[str, Any] = {"id": res.id, "state": state}
    if state == "SUCCESS":
        doc["result"] = info
    elif state == "FAILURE":
        doc["error"] = str(info)
    elif state == "PROGRESS" and isinstance(info, dict):
        doc["progress"] = {k: info.get(k) for k in ("done", "total", "phase")}
    return doc


def _in_broker(job_id: str) -> str | None:
    """``queued`` / ``taken`` when a message with this id is in Redis, else None."""
    from workers.client import client

    app = client()
    queue = str(app.conf.task_default_queue)
    keys = [queue, *(f"{queue}\x06\x16{step}" for step in (3, 6, 9)), "unacked"]
    with app.connection_for_read() as conn:
        redis = conn.default_channel.client  # type: ignore[attr-defined]  # kombu's redis
        found = int(redis.eval(_FIND_MESSAGE, len(keys), *keys, job_id))
    return None if found == 0 else "taken" if keys[found - 1] == "unacked" else "queued"


def _ledger_status(job_id: str, settings: Settings) -> dict[str, Any]:
    from workers import db

    try:
        with db.connect(settings, connect_timeout=3) as conn:
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


def wait_for(job_id: str, settings: Settings, *, show: bool,
             timeout: float | None = None) -> dict[str, Any]:
    """Poll until the job ends or ``timeout`` passes, with a progress bar on stderr when
    ``show`` (else a plain line per phase). After a few seconds still queued, say on
    stderr when no worker consumes the queue, and how to start one."""
    from rich.progress import Progress

    from cli.common import console

    began = time.monotonic()
    deadline = None if timeout is None else began + timeout
    checked, phase = False, None
    with Progress(transient=True, disable=not show, console=console(stderr=True)) as bar:
        task = bar.add_task(f"job {job_id[:8]}", total=None)
        while True:
            doc = job_status(job_id, settings)
            if doc["state"] in JOB_STATES_DONE:
                return doc
            if "progress" in doc:
                progress = doc["progress"]
                bar.update(task, completed=progress["done"], total=progress["total"],
                           description=f"job {job_id[:8]} {progress.get('phase') or ''}")
                if not show and progress.get("phase") != phase:
                    phase = progress.get("phase")
                    click.echo(f"{job_id}: {phase or 'running'} ({progress['done']}/"
                               f"{progress['total']})", err=True)
            if not checked and doc["state"] == "PENDING" and time.monotonic() - began > 3:
                checked = True
                _say_when_nobody_consumes(job_id, settings)
            if deadline is not None and time.monotonic() > deadline:
                return doc
            long_running()  # not done at the first look: this may go on for a while
            time.sleep(0.2)


def _say_when_nobody_consumes(job_id: str, settings: Settings) -> None:
    from workers.client import client

    app = client()
    from workers.scrub import scrub

    queue = str(app.conf.task_default_queue)
    replies = app.control.inspect(timeout=1.0).active_queues() or {}
    if any(q.get("name") == queue for queues in replies.values() for q in queues or ()):
        return
    click.echo(f"repoindex: no worker is consuming queue '{queue}' at "
               f"{scrub(settings.redis_url)}; the job stays queued until one starts "
               "(`repoindex worker`, README \"Running workers\"). Still waiting; Ctrl-C stops "
               f"waiting, not the job: `repoindex status {job_id}` tells later.", err=True)


@click.command()
@click.argument("source")
@click.option("--name", help="Repository name (default: last component of SOURCE).")
@click.option("--ref", default="HEAD", show_default=True)
@click.option("--wait", is_flag=True, help="Wait, showing progress, and print the summary.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="With --wait: stop waiting after SECONDS (exit 5; the job stays queued).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def enqueue(ctx: click.Context, source: str, name: str | None, ref: str, wait: bool,
            timeout: float | None, as_json: bool) -> None:
    """Queue repoindex.index_repository for SOURCE and print the job id."""
    from workers.client import client

    app = client()
    kwargs: dict[str, Any] = {"source": source, "ref": ref}
    if name:
        kwargs["name"] = name
    job_id = app.send_task("repoindex.index_repository", kwargs=kwargs).id
    if not wait:
        emit({"id": job_id, "state": "PENDING"}, as_json, lambda: click.echo(job_id))
        return
    try:
        # The id first, so that a caller who stops waiting can still ask about the job.
        click.echo(job_id, err=as_json)
        sys.stdout.flush()
        doc = wait_for(job_id, settings_of(ctx), show=not as_json and sys.stderr.isatty(),
                       timeout=timeout)
    except KeyboardInterrupt:
        click.echo(f"repoindex: stopped waiting; job {job_id} goes on (it is durable): "
                   f"`repoindex status {job_id}` tells later", err=True)
        _die_of_sigint()
    emit(doc, as_json, lambda: click.echo(_describe(doc)))
    if doc["state"] not in JOB_STATES_DONE:
        click.echo(f"repoindex: job {job_id} not finished after {timeout:g}s (still "
                   f"{doc['state']}); it stays queued: `repoindex status {job_id}` tells later",
                   err=True)
    sys.exit(exit_status(doc))


def _die_of_sigint() -> None:
    """End as a process killed by Ctrl-C does (status 130 in a shell), so that a shell loop
    or script running us stops too, instead of taking a normal exit for a result."""
    import os
    import signal

    sys.stdout.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def exit_status(doc: dict[str, Any]) -> int:
    """0 succeeded, 1 failed or revoked, 2 unknown id, 5 not finished (README "CLI")."""
    state = doc["state"]
    return (0 if state == "SUCCESS" else EXIT_UNKNOWN if state == "UNKNOWN"
            else EXIT_FAILED if state in JOB_STATES_DONE else EXIT_NOT_DONE)


def _describe(doc: dict[str, Any]) -> str:
    if doc["state"] == "UNKNOWN":
        return (f"{doc['id']} UNKNOWN: no such job (the result backend, the run ledger and the "
                "queue know nothing of this id; results are kept 7 days)")
    if doc["state"] == "PENDING" and doc.get("broker"):
        return f"{doc['id']} PENDING: " + ("queued, no worker has taken it yet"
                                           if doc["broker"] == "queued"
                                           else "taken by a worker, not started yet")
    if doc["state"] == "SUCCESS":
        return f"{doc['id']} SUCCESS\n" + json.dumps(doc["result"], indent=2, default=str)
    return f"{doc['id']} {doc['state']}" + (f": {doc['error']}" if doc.get("error") else "")


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job's state and its result or error (exit status: README "CLI")."""
    doc = job_status(job_id, settings_of(ctx))
    emit(doc, as_json, lambda: click.echo(_describe(doc)))
    sys.exit(exit_status(doc))


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def delete(ctx: click.Context, name: str, as_json: bool) -> None:
    """Queue repoindex.delete_repository for NAME and wait for it."""
    from workers.client import client

    app = client()
    job_id = app.send_task("repoindex.delete_repository", kwargs={"name": name}).id
    doc = wait_for(job_id, settings_of(ctx), show=False)
    missing = doc["state"] == "SUCCESS" and not doc["result"].get("deleted")
    emit(doc, as_json, lambda: click.echo(
        f"repository {name!r} does not exist; nothing deleted" if missing else _describe(doc)))
    sys.exit(EXIT_FAILED if missing else exit_status(doc))
