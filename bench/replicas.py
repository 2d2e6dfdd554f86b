"""Fleets: ``bench replicas`` (throughput of 1, 2, 4 ... replicas) and the "operations in
flight at once" measure of ``bench all``."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.common import make_repo, migrated, reset, workspace
from bench.load import concurrent_run, fleet, throughput
from devtools import devservices, netns
from workers.errors import ConfigError


def bench_concurrent(ops: int, replicas: int, echo: Callable[[str], None],
                     latency: float = 0.0) -> dict[str, Any]:
    """``ops`` index operations in flight at once on ``replicas`` x ``ops/replicas``
    children with pools of one connection, against a private PostgreSQL whose
    max_connections is the budget plus 20. With ``latency`` (seconds; root only) the fleet
    runs in a network namespace and reaches Redis and PostgreSQL through relays that hold
    every request that long (``devtools.netns``: the kernel may lack ``netem``)."""
    children = -(-ops // replicas)
    budget = replicas * children
    with workspace() as ws, contextlib.ExitStack() as stack:
        tmp = ws.tmp
        server = devservices.PostgresServer(tmp, {"max_connections": str(budget + 20)}).start()
        stack.callback(server.stop)
        echo(f"generating {ops} repositories …")
        repos = [make_repo(tmp / "repos" / f"r{i:03d}", 40, seed=f" of {i}")
                 for i in range(ops)]
        env = {**ws.env, "DATABASE_URL": server.url,
               "REPOINDEX_DB_POOL_MIN": "0", "REPOINDEX_DB_POOL_MAX": "1",
               "REPOINDEX_DB_POOL_TIMEOUT": "120", "REPOINDEX_METRICS_PORT": "0"}
        wrap: list[str] = []
        if latency:
            reason = netns.unavailable()
            if reason is not None:
                raise ConfigError(f"--latency-ms needs a network namespace: {reason}")
            network = netns.Network(["services"])
            stack.callback(network.close)
            relay = netns.DelayRelay(latency)
            stack.callback(relay.close)
            host = network.links["services"].host_ip
            redis = urlsplit(ws.endpoints.redis_url)
            port = relay.relay(host, redis.hostname or "127.0.0.1", redis.port or 6379)
            cred = redis.netloc.rpartition("@")[0]
            env["REDIS_URL"] = urlunsplit(redis._replace(
                netloc=(f"{cred}@" if cred else "") + f"{host}:{port}"))
            env["DATABASE_URL"] = (f"postgresql://repoindex@{host}:"
                                   f"{relay.relay(host, '127.0.0.1', server.port)}/postgres")
            wrap = network.wrap()
        queue = f"conc-{os.getpid()}"
        with fleet(env, tmp, replicas=replicas, concurrency=children, queue=queue,
                   wrap=wrap) as workers:
            echo(f"{replicas} replicas x {children} children up; running {ops} at once …")
            result = concurrent_run(ws.app, workers, queue, server.url, repos)
            logs = "".join(w.log() for w in workers)
    result.update(replicas=replicas, children_per_replica=children, connection_budget=budget,
                  latency_s=latency, pool_timeouts=logs.count("no database connection within"))
    return result


def bench_replicas(counts: list[int], jobs: int, files: int, runs: int,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Throughput (index operations per second) of 1, 2, 4 ... replicas of one child each
    on the same multi-job load; each count measured ``runs`` times, counts alternated."""
    samples: dict[int, list[float]] = {n: [] for n in counts}
    with workspace(REPOINDEX_METRICS_PORT="0") as ws:
        tmp, app = ws.tmp, ws.app
        echo(f"generating {jobs} repositories of {files} files …")
        repos = [make_repo(tmp / "repos" / f"r{i:03d}", files, seed=f" of {i}")
                 for i in range(jobs)]
        migrated(ws.endpoints.database_url)
        for run in range(runs):
            for n in counts:
                reset(ws.endpoints.database_url)
                queue = f"rep-{n}-{run}-{os.getpid()}"
                with fleet(ws.env, tmp, replicas=n, concurrency=1, queue=queue,
                           name=f"rep{n}") as workers:
                    app.send_task("repoindex.canary", queue=queue,
                                  kwargs={"seconds": 0}).get(timeout=60)  # schema, pools
                    samples[n].append(throughput(app, queue, repos))
                    del workers
                echo(f"run {run + 1}/{runs}: {n} replica(s): {samples[n][-1]:.2f} ops/s")
    med = {n: statistics.median(v) for n, v in samples.items()}
    return {"jobs": jobs, "files": files, "runs": runs, "cpus": os.cpu_count(),
            "ops_per_s": med, "samples": samples,
            "speedup": {n: med[n] / med[counts[0]] for n in counts}}
