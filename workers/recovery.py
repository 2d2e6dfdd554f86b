"""Orphan recovery: the jobs of a replica that is gone go back to the queue in seconds.

Redis keeps every job a replica has taken and not yet acknowledged in kombu's ``unacked``
hash (delivery tag -> message) and gives it back only after the visibility timeout (an
hour here, so that a long operation on a live replica is never run twice). What Redis
does not keep is *which replica* holds a tag, nor whether that replica is alive. This
consumer step adds both, in Redis itself:

- ``repoindex:lease:<node>``: the replica's lease, a key with a TTL of
  ``REPOINDEX_REPLICA_LEASE`` seconds, renewed every quarter of it by a thread of the main
  process (so a replica busy with long operations keeps it). Its value lists the replica's
  live children, which the ledger reads to tell a live attempt from a dead one.
- ``repoindex:held:<node>``: the delivery tags the replica holds (running and prefetched),
  rewritten on each renewal from kombu's own record (``channel.qos._delivered``).

Each renewal also looks at every replica in ``repoindex:replicas``: one whose lease has
expired is *gone* (its main process died, its host is down, or it has been cut off from
Redis for longer than the lease). The first survivor to take ``repoindex:recovering:<node>``
returns each of its tags still in ``unacked`` to the front of its queue with kombu's
``restore_by_tag`` (the transaction kombu uses at shutdown), then forgets the replica.
A tag already acknowledged is not in ``unacked`` and is skipped, so nothing finished runs
again; the run ledger makes a job that meets a copy of itself wait for that copy's outcome.

A replica cut off for longer than its lease that comes back finds its tags gone: its
acknowledgements then delete nothing, and the ledger (``workers.ledger``) keeps the job's
outcome to one ``succeeded`` row. A clean shutdown restores its own unacked jobs (kombu)
and deletes its lease and held set, so nothing is left to recover.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import psutil
import redis
from celery import bootsteps

from workers.ledger import Attempt, same_host_alive
from workers.settings import process_settings

log = logging.getLogger("repoindex.recovery")

PREFIX = "repoindex:"
REPLICAS = PREFIX + "replicas"


def lease_key(node: str) -> str:
    return f"{PREFIX}lease:{node}"


def held_key(node: str) -> str:
    return f"{PREFIX}held:{node}"


def client_for(url: str) -> redis.Redis:
    """A Redis client whose calls cannot hang on a half-open connection."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                socket_keepalive=True, health_check_interval=30)


_child_client: tuple[int, redis.Redis] | None = None  # (pid, client) of a worker child


def attempt_alive(attempt: Attempt, redis_url: str) -> bool:
    """Is a ``running`` ledger attempt still running? On this host its pid says so; on
    another, its replica's lease: none means the replica is gone; one that lists the pid,
    or was renewed before the attempt began (the pid may be a child too new to be listed),
    means alive."""
    local = same_host_alive(attempt)
    if local is not None:
        return local
    if not attempt.node:
        return False
    global _child_client
    if _child_client is None or _child_client[0] != os.getpid():
        _child_client = (os.getpid(), client_for(redis_url))
    raw = _child_client[1].get(lease_key(attempt.node))
    if raw is None:
        return False
    try:
        doc = json.loads(raw)
        return attempt.pid in doc["pids"] or float(doc["at"]) < attempt.started
    except (ValueError, KeyError, TypeError):
        return True  # a lease we cannot read is still a lease


class Lease:
    """A replica's lease and held tags, and the sweep of the replicas that are gone."""

    def __init__(self, client: redis.Redis, node: str, seconds: float,
                 tags: Any, restore: Any) -> None:
        self.client, self.node, self.seconds = client, node, seconds
        self.tags = tags          # () -> the delivery tags this replica holds
        self.restore = restore    # (tag) -> None: put one unacked message back
        self._registered = False

    def renew(self) -> bool:
        """Write the lease and the held tags; return whether the lease was still there."""
        me = psutil.Process()
        pids = [c.pid for c in me.children()]
        tags = self.tags()
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(lease_key(self.node))
        pipe.set(lease_key(self.node), json.dumps({"pid": os.getpid(), "pids": pids,
                                                   "at": time.time()}),
                 px=int(self.seconds * 1000))
        pipe.delete(held_key(self.node))
        if tags:
            pipe.sadd(held_key(self.node), *tags)
        pipe.sadd(REPLICAS, self.node)
        return bool(pipe.execute()[0])

    def sweep(self) -> int:
        """Recover the replicas whose lease has expired; return the jobs put back."""
        returned = 0
        for raw in self.client.smembers(REPLICAS):
            node = raw.decode() if isinstance(raw, bytes) else str(raw)
            if node == self.node or self.client.exists(lease_key(node)):
                continue
            # one survivor per gone replica; the mark outlives a sweep that dies midway
            if not self.client.set(f"{PREFIX}recovering:{node}", self.node, nx=True,
                                   px=int(self.seconds * 1000)):
                continue
            tags = [t.decode() if isinstance(t, bytes) else str(t)
                    for t in self.client.smembers(held_key(node))]
            for tag in tags:
                self.restore(tag)
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(held_key(node))
            pipe.srem(REPLICAS, node)
            pipe.execute()
            returned += len(tags)
            log.warning("replica %s is gone (no lease for %gs): %d of its jobs returned to"
                        " the queue", node, self.seconds, len(tags))
        return returned

    def tick(self) -> None:
        """Renew this replica's lease (saying so if it had lapsed), then sweep."""
        if not self.renew() and self._registered:
            log.warning("this replica %s lost its lease (cut off from Redis, or stalled, for"
                        " over %gs): another replica may be running its jobs; the run ledger"
                        " keeps each job to one outcome", self.node, self.seconds)
        self._registered = True
        self.sweep()

    def release(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(lease_key(self.node), held_key(self.node))
        pipe.srem(REPLICAS, self.node)
        pipe.execute()


def _delivered_tags(consumer: Any) -> list[str]:
    """The delivery tags kombu's QoS holds for this replica (running and prefetched)."""
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None)
    if delivered is None:
        return []
    for _ in range(5):  # another thread may be changing it
        try:
            return [str(t) for t in list(delivered)]
        except RuntimeError:
            continue
    return []


class Recovery(bootsteps.StartStopStep):
    """Consumer step: the lease thread of this replica (README "Losing a replica")."""

    label = "repoindex recovery"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and by each job received
        self.lease: Lease | None = None

    def start(self, parent: Any) -> None:
        settings = process_settings()
        if not settings.replica_lease or not settings.redis_url.startswith(("redis", "rediss")):
            return
        consumer = parent
        app = consumer.app

        def restore(tag: str) -> None:
            with app.connection_for_write() as conn:
                conn.default_channel.qos.restore_by_tag(tag, leftmost=True)

        self.lease = Lease(client_for(settings.redis_url), consumer.hostname,
                           settings.replica_lease, lambda: _delivered_tags(consumer), restore)
        self._stop.clear()
        consumer.repoindex_recovery = self  # for on_task_received
        self._thread = threading.Thread(target=self._loop, name="repoindex-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self.lease is not None
        period = self.lease.seconds / 4
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.lease.tick()
            except redis.RedisError as exc:
                log.warning("lease: Redis unreachable (%s); retrying in %gs", exc, period)
            except Exception:  # pragma: no cover - the thread must live on
                log.exception("lease: renewal failed")
            self._wake.wait(period)

    def received(self) -> None:
        """A job was taken: write the held tags now, not at the next renewal (a replica
        that dies a moment after taking a job must not hide it until the visibility
        timeout). Called on the consumer's thread; the write happens on the lease's."""
        self._wake.set()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        if self.lease is not None:
            try:
                self.lease.release()
            except redis.RedisError as exc:
                log.warning("lease: could not release (%s); it expires by itself", exc)
            self.lease.client.close()
            self.lease = None


def on_task_received(sender: Any = None, **_: Any) -> None:
    """Celery's ``task_received`` (main process, sender: the consumer)."""
    step = getattr(sender, "repoindex_recovery", None)
    if step is not None:
        step.received()
