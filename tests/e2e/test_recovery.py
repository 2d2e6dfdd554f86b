"""A whole replica lost: its jobs run on a survivor within seconds, exactly once; a replica
that is slow but alive keeps its jobs; copies of one job that meet give one outcome."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import psycopg
import redis

from tests.conftest import start_worker
from tests.e2e.support import ledger_states, queue_length, wait_until
from workers import recovery

LEASE = "3"  # seconds: the test's bound is 1.25 x this plus a survivor's pick-up


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def _unacked(client: redis.Redis, queue: str) -> int:
    """Messages of ``queue`` taken by a worker and not yet acknowledged (kombu's hash)."""
    return sum(json.loads(v)[2] == queue for v in client.hvals("unacked"))


def _in_progress(db: psycopg.Connection[Any], job_ids: list[str]) -> int:
    if db.execute("SELECT to_regclass('runs')").fetchone() == (None,):
        return 0  # the first operation of the session has not applied the schema yet
    return int(db.execute("SELECT count(*) FROM runs WHERE job_id = ANY(%s) AND state ="
                          " 'running'", (job_ids,)).fetchone()[0])  # type: ignore[index]


def test_replica_sigkilled_with_jobs_in_flight_and_prefetched(
        celery_app: Any, db: psycopg.Connection[Any]) -> None:
    queue = f"recover-{uuid.uuid4().hex[:6]}"
    env = {"REPOINDEX_REPLICA_LEASE": LEASE}
    doomed = start_worker("doomed", concurrency=2, queue=queue, env=env,
                          args=("--prefetch-multiplier=2",))
    jobs = [celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 6})
            for _ in range(4)]
    ids = [j.id for j in jobs]
    client = _redis()
    try:
        # 2 running, 2 prefetched: the queue is empty and the doomed replica holds all 4
        wait_until(lambda: _in_progress(db, ids) == 2 and queue_length(queue) == 0, 60,
                   "2 operations running and 2 prefetched")
        wait_until(lambda: len(client.smembers(recovery.held_key(doomed.node))) == 4, 30,
                   "the 4 tags in the doomed replica's held set")
        survivor = start_worker("survivor", concurrency=2, queue=queue, env=env)
        killed = time.time()
        os.killpg(doomed.pid, signal.SIGKILL)
        assert doomed.proc is not None
        doomed.proc.wait()
        try:
            results = [j.get(timeout=120) for j in jobs]
            # a result is stored just before its message is acknowledged: a stop in between
            # would (rightly) put the message back
            wait_until(lambda: _unacked(client, queue) == 0, 30, "every job acknowledged")
        finally:
            assert survivor.stop() == 0
        assert [r["job"] for r in results] == ids
        states = {i: ledger_states(db, i) for i in ids}
        assert sorted(states.values()) == [["lost", "succeeded"]] * 2 + [["succeeded"]] * 2, \
            states
        # each job started on the survivor within the bound (seconds, not the hour-long
        # visibility timeout)
        starts = [r[0] for r in db.execute(
            "SELECT extract(epoch FROM started_at) FROM runs WHERE job_id = ANY(%s) AND state"
            " = 'succeeded'", (ids,))]
        delay = max(float(s) for s in starts) - killed
        print(f"SIGKILL of a replica to its last job started elsewhere: {delay:.1f}s")
        assert delay < 30
        # recovered by a lease sweep (the survivor's, or another live replica's of this
        # Redis: one CI run found the line in neither log it could read): the sweep
        # removes the gone replica from the registry and its held set, checked below
        # nothing of the dead replica is left in Redis: no unacked copy, no lease, no set
        assert not client.exists(recovery.held_key(doomed.node), recovery.lease_key(doomed.node))
        assert not client.sismember(recovery.REPLICAS, doomed.node)
        left = [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]
        assert left == [], (left, ids, survivor.log()[-3000:])
    finally:
        client.close()
        doomed.stop()


def test_slow_replica_keeps_its_job(celery_app: Any, db: psycopg.Connection[Any]) -> None:
    """An operation four times longer than the lease, with a second replica watching:
    it runs once, attempt 1, never taken for lost."""
    queue = f"slow-{uuid.uuid4().hex[:6]}"
    env = {"REPOINDEX_REPLICA_LEASE": "1"}
    first = start_worker("slow", concurrency=1, queue=queue, env=env)
    job = celery_app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 4})
    try:
        wait_until(lambda: _in_progress(db, [job.id]) == 1, 60, "the operation running")
        second = start_worker("watcher", concurrency=1, queue=queue, env=env)
        try:
            job.get(timeout=60)
            time.sleep(2)  # two of the watcher's sweeps after the end
        finally:
            assert second.stop() == 0
        assert ledger_states(db, job.id) == ["succeeded"]
        assert "is gone" not in second.log() and "is gone" not in first.log()
    finally:
        assert first.stop() == 0
    with _redis() as client:  # a clean stop leaves nothing to recover
        assert not client.exists(recovery.lease_key(first.node), recovery.held_key(first.node))


def test_copies_of_a_job_sent_at_the_same_moment_give_one_outcome(
        celery_app: Any, db: psycopg.Connection[Any]) -> None:
    """100 jobs, each sent twice at once to 2 replicas x 2 children: one `succeeded` row
    per job, no attempt taken for lost, and SUCCESS with the result for the caller."""
    queue = f"copies-{uuid.uuid4().hex[:6]}"
    replicas = [start_worker(f"copies{i}", concurrency=2, queue=queue) for i in range(2)]
    try:
        ids = [str(uuid.uuid4()) for _ in range(100)]
        for job_id in ids:
            for _ in range(2):
                celery_app.send_task("repoindex.canary", queue=queue, task_id=job_id,
                                     kwargs={"seconds": 0.2})
        wait_until(lambda: db.execute(
            "SELECT count(*) FROM runs WHERE job_id = ANY(%s) AND state = 'succeeded'",
            (ids,)).fetchone() == (100,) and queue_length(queue) == 0, 180,
            "every job succeeded once")
        for r in replicas:  # both copies of every job are done (acknowledged)
            wait_until(lambda r=r: not (celery_app.control.inspect(
                destination=[r.node], timeout=2).active() or {}).get(r.node), 60,
                f"{r.node} idle")
        rows = db.execute("SELECT job_id, array_agg(state ORDER BY id) FROM runs"
                          " WHERE job_id = ANY(%s) GROUP BY job_id", (ids,)).fetchall()
        assert {tuple(states) for _, states in rows} == {("succeeded",)}
        assert len(rows) == 100
        logs = "".join(r.log() for r in replicas)
        # every job's other copy was answered with the first one's result
        assert sum(f"duplicate delivery of {i} ignored" in logs for i in ids) == 100
        print(f"copies that met a live copy and waited for it: {logs.count('waiting for its')}")
        for job_id in ids:
            result = celery_app.AsyncResult(job_id)
            assert result.get(timeout=30)["job"] == job_id
            assert result.state == "SUCCESS"
    finally:
        for r in replicas:
            assert r.stop() == 0


def test_a_job_id_is_an_idempotency_key(celery_app: Any, db: psycopg.Connection[Any]) -> None:
    """The same id with the same arguments returns the earlier result without running again;
    with other arguments it is refused, and the earlier job's ledger rows are kept."""
    queue = f"idem-{uuid.uuid4().hex[:6]}"
    worker = start_worker("idem", concurrency=1, queue=queue)
    try:
        job_id = str(uuid.uuid4())
        first = celery_app.send_task("repoindex.canary", queue=queue, task_id=job_id,
                                     kwargs={"seconds": 0.1}).get(timeout=60)
        again = celery_app.send_task("repoindex.canary", queue=queue, task_id=job_id,
                                     kwargs={"seconds": 0.1}).get(timeout=60)
        assert again == first
        celery_app.send_task("repoindex.canary", queue=queue, task_id=job_id,
                                     kwargs={"seconds": 2})
        wait_until(lambda: ledger_states(db, job_id) == ["succeeded", "failed"], 60,
                   "the reused id refused")
        error = db.execute("SELECT error FROM runs WHERE job_id = %s AND state = 'failed'",
                           (job_id,)).fetchone()
        assert error == (f"job id {job_id} was already used with different arguments; the"
                         " earlier job is kept: send this one with a new id",)
        assert "already used with different arguments" in worker.log()
        # Celery never writes over a SUCCESS: the id keeps answering the earlier result
        assert celery_app.backend.get_task_meta(job_id, cache=False)["result"] == first
    finally:
        assert worker.stop() == 0
