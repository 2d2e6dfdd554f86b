"""Network partitions: a real replica in a network namespace of its own (and, to the others,
on a host of its own), joined to a private Redis and PostgreSQL by veth links that are cut
(every packet dropped both ways: half-open connections, as in a real partition) and healed
while its operations run (README "Losing a replica")."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery

from devtools import netns
from devtools.devservices import PostgresServer, RedisServer, create_database
from devtools.launcher import WorkerProcess
from tasks.store import GC_LOCK
from tests import gitrepo
from tests.conftest import _comparable
from tests.e2e.support import (
    assert_same,
    fleet_state,
    inside_states,
    leak_lines,
    ledger_states,
    server_sessions,
    settle,
    wait_until,
    warm_up,
)
from workers.db import migrate


@dataclass
class Site:
    """The test network and the private servers on its links' host ends."""

    network: netns.Network
    redis_url: str
    database_url: str
    app: Celery
    logs: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"partition tests need a network namespace of their own: {reason}")
    tmp = tmp_path_factory.mktemp("partition")
    with contextlib.ExitStack() as stack:
        network = netns.Network(["redis", "postgres"])
        stack.callback(network.close)
        r, p = network.links["redis"], network.links["postgres"]
        server = RedisServer(tmp, host=r.host_ip).start()
        stack.callback(server.stop)
        both_ends = ipaddress.ip_interface(f"{p.host_ip}/30").network
        pg = PostgresServer(tmp, host=p.host_ip, trust=str(both_ends)).start()
        stack.callback(pg.stop)
        database_url = create_database(pg.url, "partition")
        with psycopg.connect(database_url, autocommit=True) as conn:
            migrate(conn)
            conn.execute("CREATE TABLE IF NOT EXISTS probe_rows (tag text)")
        app = Celery("partition", set_as_current=False)
        app.config_from_object("celeryconfig")
        app.conf.update(broker_url=server.url, result_backend=server.url)
        stack.callback(app.close)
        yield Site(network, server.url, database_url, app, tmp)


@pytest.fixture
def db(site: Site) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(site.database_url, autocommit=True) as conn:
        yield conn


def replica(site: Site, name: str, *, far: bool, queue: str, env: dict[str, str],
            concurrency: int = 1) -> WorkerProcess:
    """A real worker on ``queue``; ``far``: in the namespace, under a host name of its own."""
    unique = f"{name}-{uuid.uuid4().hex[:6]}"
    host = f"far-{unique}" if far else None
    full = {**os.environ, "REDIS_URL": site.redis_url, "DATABASE_URL": site.database_url, **env}
    return WorkerProcess(full, name=unique, log_path=site.logs / f"{unique}.log",
                         concurrency=concurrency, app="tests.app", queue=queue,
                         wrap=site.network.wrap(host) if far else (), host=host).start()


def _running(db: psycopg.Connection[Any], ids: list[str], node: str) -> int:
    row = db.execute("SELECT count(*) FROM runs WHERE job_id = ANY(%s) AND state = 'running'"
                     " AND node = %s", (ids, node)).fetchone()
    return int(row[0]) if row else 0


def _waiting_at_gate(gate: psycopg.Connection[Any]) -> int:
    row = gate.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid"
                       " = %s AND objid = 0 AND NOT granted", (GC_LOCK,)).fetchone()
    return int(row[0]) if row else 0


def _index(db: psycopg.Connection[Any], name: str) -> tuple[str | None, set[str]]:
    row = db.execute("SELECT commit FROM repositories WHERE name = %s", (name,)).fetchone()
    paths = {r[0] for r in db.execute("SELECT f.path FROM files f JOIN repositories r ON"
                                      " r.id = f.repo_id WHERE r.name = %s", (name,))}
    return (row[0] if row else None), paths


def _no_busy_sessions(db: psycopg.Connection[Any]) -> None:
    """No session of ours left active or idle in a transaction (a cut-off client's session
    ends within REPOINDEX_NET_TIMEOUT on the server side too)."""
    wait_until(lambda: server_sessions(db) == [], 90, f"no busy sessions: {server_sessions(db)}")


def test_cut_from_redis_and_postgres_for_20s_then_healed(
        site: Site, db: psycopg.Connection[Any], roots: Path, temp_root: Path) -> None:
    """Two index operations inside their transactions and two more queued, a watcher
    replica beside: cut 20 s (shorter than the lease here, so the replica is not judged
    gone), healed, then the operations go on. Every job succeeds once, each index is whole,
    the cut-off replica's children are back at their baselines and no session is left
    busy."""
    queue = f"cut20-{uuid.uuid4().hex[:6]}"
    env = {"REPOINDEX_REPLICA_LEASE": "60"}  # > the cut: a 20 s silence is not "gone"
    far = replica(site, "cut20", far=True, queue=queue, env=env, concurrency=2)
    watcher = None
    try:
        warm_up(site.app, far)
        before = _comparable(fleet_state(far, temp_root), inside_states(site.app, far))
        repos = gitrepo.generated_many(roots, f"cut20-{uuid.uuid4().hex[:4]}", 4, files=40)
        with psycopg.connect(site.database_url, autocommit=True) as gate:
            # the operations wait at the blob lock, inside their transactions, as long as
            # this connection holds it (as garbage collection would)
            gate.execute("SELECT pg_advisory_lock(%s, 0)", (GC_LOCK,))
            jobs = [site.app.send_task("repoindex.index_repository", queue=queue,
                                       kwargs={"source": str(r), "name": r.name})
                    for r in repos]
            ids = [j.id for j in jobs]
            wait_until(lambda: _waiting_at_gate(gate) == 2 and _running(db, ids, far.node)
                       == 2, 60, "2 operations of the far replica inside their transactions")
            watcher = replica(site, "watcher", far=False, queue=queue, env=env, concurrency=2)
            wait_until(lambda: _waiting_at_gate(gate) == 4, 60, "the watcher's 2 waiting")
            site.network.cut()
            time.sleep(20)
            site.network.heal()
            gate.execute("SELECT pg_advisory_unlock(%s, 0)", (GC_LOCK,))
            results = [j.get(timeout=120) for j in jobs]
        for repo, result in zip(repos, results, strict=True):
            head = gitrepo.git(repo, "rev-parse", "HEAD").strip()
            assert result["commit"] == head
            assert _index(db, repo.name) == (head, gitrepo.tracked(repo))
        assert {i: ledger_states(db, i) for i in ids} == {i: ["succeeded"] for i in ids}
        settle(site.app, [far, watcher], timeout=60)
        inside = inside_states(site.app, far)
        for state in inside.values():
            assert state["leaks"] == {} and state["pool"]["checked_out"] == 0, state
        assert_same(_comparable(fleet_state(far, temp_root), inside), before)
        assert leak_lines(far) == [], "\n".join(leak_lines(far))
        assert "is gone" not in watcher.log() + far.log()
        _no_busy_sessions(db)
    finally:
        if watcher is not None:
            assert watcher.stop() == 0
        assert far.stop() == 0


def test_cut_past_the_lease_its_job_runs_elsewhere_and_the_stale_attempt_is_fenced(
        site: Site, db: psycopg.Connection[Any], roots: Path) -> None:
    """A job of the far replica (pinned to commit C1) is working outside its transaction
    when the link is cut for 20 s, far past the 3 s lease: the survivor runs it (attempt 2,
    within the bound), then a newer job indexes C2. Healed, the far replica's attempt
    reaches its commit and is fenced: rolled back, C2 stays, the ledger keeps one
    `succeeded` row per job and the caller's SUCCESS."""
    queue = f"fence-{uuid.uuid4().hex[:6]}"
    env = {"REPOINDEX_REPLICA_LEASE": "3", "REPOINDEX_NET_TIMEOUT": "5",
           # the far attempt waits out the cut for a connection, then goes on to its commit
           "REPOINDEX_DB_POOL_TIMEOUT": "60"}
    repo = roots / f"fence-{uuid.uuid4().hex[:6]}"
    gitrepo.generated(repo, files=30)
    c1 = gitrepo.git(repo, "rev-parse", "HEAD").strip()
    gitrepo.write(repo / "newer.txt", "added after c1\n")
    c2 = gitrepo.commit(repo, "newer")
    kwargs = {"source": str(repo), "name": repo.name, "ref": c1}
    far = replica(site, "fenced", far=True, queue=queue, env=env)
    survivor = None
    try:
        job = site.app.send_task("probe.index_after", queue=queue,
                                 kwargs={"seconds": 8, **kwargs})
        wait_until(lambda: _running(db, [job.id], far.node) == 1, 60, "the far attempt")
        survivor = replica(site, "survivor", far=False, queue=queue, env=env, concurrency=2)
        cut = time.time()
        site.network.cut()
        try:
            assert job.get(timeout=60)["commit"] == c1
            started = db.execute("SELECT extract(epoch FROM started_at) FROM runs WHERE"
                                 " job_id = %s AND state = 'succeeded'", (job.id,)).fetchone()
            assert started is not None
            delay = float(started[0]) - cut
            print(f"cut to the job's attempt on the survivor: {delay:.1f}s")
            assert delay < 15
            newer = site.app.send_task("repoindex.index_repository", queue=queue,
                                       kwargs={**kwargs, "ref": c2})
            assert newer.get(timeout=60)["commit"] == c2
            time.sleep(max(0.0, 20 - (time.time() - cut)))  # 20 s, or until K committed
        finally:
            site.network.heal()
        far.wait_for_log("rolled back, not committed", 90)
        assert "is 'lost' in the run ledger" in far.log()
        far.wait_for_log("lost its lease", 30)  # the main process says so on its next renewal
        assert _index(db, repo.name) == (c2, gitrepo.tracked(repo))
        assert ledger_states(db, job.id) == ["lost", "succeeded"]
        assert ledger_states(db, newer.id) == ["succeeded"]
        assert site.app.AsyncResult(job.id).state == "SUCCESS"
        again = site.app.send_task("probe.index_after", queue=queue, task_id=job.id,
                                   kwargs={"seconds": 8, **kwargs}).get(timeout=60)
        assert again["commit"] == c1  # the job id's one outcome, not run again
        assert ledger_states(db, job.id) == ["lost", "succeeded"]
        _no_busy_sessions(db)
    finally:
        if survivor is not None:
            assert survivor.stop() == 0
        assert far.stop() == 0


REDIS_CUT = 15  # seconds: 3 x REPOINDEX_NET_TIMEOUT (5), see the test's docstring


def test_cut_from_redis_only_operations_finish_and_commit_and_nothing_repeats(
        site: Site, db: psycopg.Connection[Any], roots: Path) -> None:
    """Cut from Redis only, PostgreSQL still there, for REDIS_CUT s with REPOINDEX_NET_TIMEOUT
    5: the same sequence as 60 s at the default 30 (every Redis connection of the replica
    declared dead, reconnections failing, then succeeding), and shorter than the lease.
    The two operations in flight commit during the cut (their progress reports given up,
    their results and acknowledgements waiting for Redis); after the heal each job has one
    attempt, one `succeeded` row, and its caller gets SUCCESS, not the FAILURE Celery
    stored for a result it could not write."""
    queue = f"redis-{uuid.uuid4().hex[:6]}"
    env = {"REPOINDEX_REPLICA_LEASE": "30", "REPOINDEX_NET_TIMEOUT": "5"}
    repos = gitrepo.generated_many(roots, f"rcut-{uuid.uuid4().hex[:4]}", 2, files=40)
    far = replica(site, "rediscut", far=True, queue=queue, env=env, concurrency=2)
    try:
        jobs = [site.app.send_task("probe.index_after", queue=queue,
                                   kwargs={"seconds": 3, "source": str(r), "name": r.name})
                for r in repos]
        ids = [j.id for j in jobs]
        wait_until(lambda: _running(db, ids, far.node) == 2, 60, "both operations running")
        cut = time.monotonic()
        site.network.cut("redis")
        try:
            wait_until(lambda: [s for i in ids for s in ledger_states(db, i)]
                       == ["succeeded"] * 2, REDIS_CUT - 2, "both committed during the cut")
            time.sleep(max(0.0, REDIS_CUT - (time.monotonic() - cut)))
        finally:
            site.network.heal("redis")
        results = [j.get(timeout=120) for j in jobs]
        for repo, result in zip(repos, results, strict=True):
            assert _index(db, repo.name) == (result["commit"], gitrepo.tracked(repo))
        with redis.Redis.from_url(site.redis_url) as client:
            wait_until(lambda: client.hlen("unacked") == 0 and client.llen(queue) == 0, 60,
                       "every copy acknowledged")
        settle(site.app, [far])
        assert {i: ledger_states(db, i) for i in ids} == {i: ["succeeded"] for i in ids}
        print("redeliveries answered from the ledger:",
              sum(f"duplicate delivery of {i} ignored" in far.log() for i in ids))
        _no_busy_sessions(db)
    finally:
        assert far.stop() == 0
