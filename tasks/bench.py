"""Benchmarks (commands, not CI tests): medians and ratios measured side by side in one run.

- ``index``: our full index through a real worker vs the floor (the simplest script that
  reads the same files and COPYs them into the same schema), the no-change re-index, and
  the worker child's peak RSS growth (VmHWM after minus VmRSS before, from /proc).
- ``lifecycle``: the same operations with the lifecycle machinery (OperationTask: ledger
  rows, scope report, sentinel snapshots) on and off, alternated, in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workers import devservices, memory

GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def make_repo(path: Path, files: int, seed: str = "") -> Path:
    """``files`` source-like files of 0.5 to 3 KiB in nested folders, committed; repositories
    of different ``seed`` share no blob."""
    subprocess.run([*GIT, "init", "-q", str(path)], check=True)
    for i in range(files):
        target = path / f"pkg{i % 20}" / f"mod{i % 13}" / f"file_{i}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n"
                       for j in range(10 + i % 60))
        target.write_text(f"# generated file {i}{seed}\n{body}")
    subprocess.run([*GIT, "-C", str(path), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(path), "commit", "-qm", "bench"], check=True)
    return path


def floor_index(database_url: str, repo: Path) -> float:
    """The floor: read every tracked file and COPY blobs and files in one transaction."""
    import psycopg

    started = time.perf_counter()
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-s"], check=True,
                             capture_output=True).stdout
    with psycopg.connect(database_url) as conn:
        repo_id = conn.execute("INSERT INTO repositories (name, source, ref) VALUES"
                               " ('floor', 'floor', 'HEAD') RETURNING id").fetchone()
        assert repo_id is not None
        rows = []
        with conn.cursor().copy("COPY blobs (sha, size, is_binary, lines, content)"
                                " FROM STDIN") as copy:
            for record in listing.split(b"\0"):
                if not record:
                    continue
                meta, path = record.split(b"\t", 1)
                data = (repo / path.decode()).read_bytes()
                sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                copy.write_row((sha, len(data), False, data.count(b"\n"), data.decode()))
                rows.append((repo_id[0], path.decode(), sha, int(meta.split()[0], 8),
                             len(data), "python", "text"))
        with conn.cursor().copy("COPY files (repo_id, path, sha, mode, size, language, kind)"
                                " FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    return time.perf_counter() - started


def _reset(database_url: str) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE repositories, files, blobs, runs")


def bench_index(files: int, runs: int, echo: Callable[[str], None]) -> dict[str, Any]:
    from workers.launcher import WorkerProcess

    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw, \
            devservices.services(f"repoindex_bench_{os.getpid()}", drop=True,
                                 own_database=True) as ep:
        tmp = Path(raw)
        echo(f"generating a {files}-file repository …")
        repo = make_repo(tmp / "repo", files)
        env = {**os.environ, "REDIS_URL": ep.redis_url, "DATABASE_URL": ep.database_url,
               "REPOINDEX_ROOTS": str(tmp), "REPOINDEX_TEMP_DIR": str(tmp / "work")}
        stack = contextlib.ExitStack()
        stack.enter_context(environ(REDIS_URL=ep.redis_url, DATABASE_URL=ep.database_url))
        worker = WorkerProcess(env, name=f"bench-{os.getpid()}", log_path=tmp / "w.log",
                               concurrency=1, queue=f"bench-{os.getpid()}")
        worker.start()
        from workers.app import app

        def index(name: str) -> dict[str, Any]:
            job = app.send_task("repoindex.index_repository", queue=worker.queue,
                                kwargs={"source": str(repo), "name": name})
            return job.get(timeout=1800)  # type: ignore[no-any-return]

        try:
            small = make_repo(tmp / "warm", 20)
            app.send_task("repoindex.index_repository", queue=worker.queue,
                          kwargs={"source": str(small)}).get(timeout=120)
            child = worker.children()[0]
            samples: dict[str, list[float]] = {"ours": [], "floor": [], "nochange": [],
                                               "rss_growth": []}
            for run in range(runs):
                _reset(ep.database_url)
                samples["floor"].append(floor_index(ep.database_url, repo))
                _reset(ep.database_url)
                rss_before = memory.proc_status(child, "VmRSS")
                result = index(f"bench{run}")
                peak = memory.proc_status(child, "VmHWM")
                samples["rss_growth"].append(max(0, peak - rss_before))
                # after the operation (memory released): the child's RSS over its RSS before
                samples.setdefault("rss_return", []).append(
                    memory.proc_status(child, "VmRSS") / rss_before)
                samples["ours"].append(result["seconds"])
                samples.setdefault("git_peak_rss", []).append(result["git_peak_rss"])
                samples["nochange"].append(index(f"bench{run}")["seconds"])
                echo(f"run {run + 1}/{runs}: ours {result['seconds']:.2f}s floor "
                     f"{samples['floor'][-1]:.2f}s no-change {samples['nochange'][-1]:.3f}s")
        finally:
            worker.stop()
            stack.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"files": files, "runs": runs, "median": med, "samples": samples,
            "files_per_s": files / med["ours"], "floor_files_per_s": files / med["floor"],
            "ratio_to_floor": med["ours"] / med["floor"]}


def bench_lifecycle(files: int, runs: int, echo: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw, \
            devservices.services(f"repoindex_bench_{os.getpid()}", drop=True,
                                 own_database=True) as ep:
        tmp = Path(raw)
        repo = make_repo(tmp / "repo", files)
        stack = contextlib.ExitStack()
        stack.enter_context(environ(REDIS_URL=ep.redis_url, DATABASE_URL=ep.database_url,
                                    REPOINDEX_ROOTS=str(tmp), REPOINDEX_TEMP_DIR=str(tmp / "w")))
        stack.callback(runtime_shutdown)
        from tasks import jobs
        from workers import runtime
        runtime.shutdown()  # a runtime made before the environment above would be stale
        rt = runtime.current()

        def on() -> float:
            # Our machinery exactly: OperationTask.__call__ (ledger rows, scope, cleanup
            # report, log context) plus the sentinel's before/after snapshots. Celery's own
            # tracer is left out of both sides.
            started = time.perf_counter()
            rt.sentinel.before("on")
            jobs.index_repository(source=str(repo), name="lc")
            rt.sentinel.after("on")
            return time.perf_counter() - started

        def off() -> float:
            # The same task body (validation included) in a bare scope: no ledger rows,
            # no sentinel, no memory release, no cleanup report.
            started = time.perf_counter()
            with rt.scope("off"):
                jobs.index_repository.run(source=str(repo), name="lc")
            return time.perf_counter() - started

        on(), off()  # warm-up: schema, pool, first index
        samples: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(runs):
            for name, fn in (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on)):
                samples[name].append(fn())
        stack.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Each on/off pair ran back to back: the median of the pairs' differences cancels the
    # machine's drift, which the difference of two medians does not.
    diff = statistics.median(a - b for a, b in zip(samples["on"], samples["off"], strict=True))
    echo(f"lifecycle on {med['on'] * 1000:.1f} ms, off {med['off'] * 1000:.1f} ms")
    return {"files": files, "runs": runs, "operation": "no-change re-index", "median": med,
            "samples": samples, "paired_diff": diff, "overhead_ratio": diff / med["off"]}


def _stop_run(env: dict[str, str], tmp: Path, queue: str, *, op_seconds: float,
              grace: float) -> dict[str, Any]:
    """One worker, two canaries in flight, SIGTERM; SIGKILL after ``grace`` like Docker."""
    import signal

    import psycopg
    import redis

    from workers.app import app
    from workers.launcher import WorkerProcess

    worker = WorkerProcess(env, name=queue, log_path=tmp / f"{queue}.log", concurrency=2,
                           queue=queue).start()
    jobs = [app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": op_seconds})
            for _ in range(2)]
    deadline = time.monotonic() + 60
    while sum(j.state == "STARTED" for j in jobs) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the canaries' transactions
    pids = [worker.pid, *worker.children()]
    started = time.perf_counter()
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.proc is not None
    try:
        worker.proc.wait(grace)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.proc.wait()
        killed = True
    seconds = time.perf_counter() - started
    broker = redis.Redis.from_url(env["REDIS_URL"])
    queued = int(broker.llen(queue))
    broker.close()
    temp_dir = Path(env["REPOINDEX_TEMP_DIR"])
    temp_left = [n for n in os.listdir(temp_dir)
                 if n.split("-", 1)[0].isdigit() and int(n.split("-", 1)[0]) in pids] \
        if temp_dir.exists() else []
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        done = conn.execute("SELECT count(*) FROM canary WHERE job_id = ANY(%s)",
                            ([j.id for j in jobs],)).fetchone()
    completed = int(done[0]) if done else 0
    succeeded = sum(j.state == "SUCCESS" for j in jobs)
    return {"seconds": seconds, "killed": killed, "completed": completed, "requeued": queued,
            "not_accounted": 2 - completed - queued, "temp_left": len(temp_left),
            "half_written": completed - succeeded}


def bench_shutdown(runs: int, op_seconds: float, grace: float,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Ours (REMAP_SIGTERM=SIGQUIT, cold path) vs stock Celery signal handling (warm
    shutdown), same app and operations, alternated; SIGKILL after ``grace`` as Docker does."""
    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw, \
            devservices.services(f"repoindex_bench_{os.getpid()}", drop=True,
                                 own_database=True) as ep:
        tmp = Path(raw)
        env = {**os.environ, "REDIS_URL": ep.redis_url, "DATABASE_URL": ep.database_url,
               "REPOINDEX_TEMP_DIR": str(tmp / "work")}
        samples: dict[str, list[dict[str, Any]]] = {"ours": [], "stock": []}
        import psycopg

        from workers.db import migrate

        with psycopg.connect(ep.database_url) as conn:
            migrate(conn)
        with environ(REDIS_URL=ep.redis_url, DATABASE_URL=ep.database_url):
            for run in range(runs):
                for mode, remap in (("ours", "SIGQUIT"), ("stock", "")):
                    queue = f"shutdown-{mode}-{run}-{os.getpid()}"
                    result = _stop_run({**env, "REMAP_SIGTERM": remap}, tmp, queue,
                                       op_seconds=op_seconds, grace=grace)
                    samples[mode].append(result)
                    echo(f"run {run + 1}/{runs} {mode}: exit after {result['seconds']:.2f}s"
                         f"{' (SIGKILL)' if result['killed'] else ''}, completed "
                         f"{result['completed']}, requeued {result['requeued']}, "
                         f"temp left {result['temp_left']}")
    summary = {mode: {"median_s": statistics.median(r["seconds"] for r in rows),
                      "max_s": max(r["seconds"] for r in rows),
                      "sigkilled": sum(r["killed"] for r in rows),
                      "jobs_not_accounted": sum(r["not_accounted"] for r in rows),
                      "temp_left": sum(r["temp_left"] for r in rows),
                      "half_written": sum(r["half_written"] for r in rows)}
               for mode, rows in samples.items()}
    return {"runs": runs, "op_seconds": op_seconds, "grace": grace, "summary": summary,
            "samples": samples}


def runtime_shutdown() -> None:
    from workers import runtime

    runtime.shutdown()


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    out += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(out)


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2, default=str))


def bench_concurrent(ops: int, replicas: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """``ops`` index operations in flight at once on ``replicas`` x ``ops/replicas``
    children with pools of one connection, against a private PostgreSQL whose
    max_connections is the budget plus 20."""
    from tasks.load import concurrent_run, fleet
    from workers.app import app

    children = -(-ops // replicas)
    budget = replicas * children
    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw, \
            devservices.services(f"repoindex_bench_{os.getpid()}", drop=True,
                                 own_database=True) as ep:
        tmp = Path(raw)
        server = devservices.PostgresServer(tmp, {"max_connections": str(budget + 20)}).start()
        try:
            echo(f"generating {ops} repositories …")
            repos = [make_repo(tmp / "repos" / f"r{i:03d}", 40, seed=f" of {i}")
                     for i in range(ops)]
            env = {**os.environ, "REDIS_URL": ep.redis_url, "DATABASE_URL": server.url,
                   "REPOINDEX_ROOTS": str(tmp), "REPOINDEX_TEMP_DIR": str(tmp / "work"),
                   "REPOINDEX_DB_POOL_MIN": "0", "REPOINDEX_DB_POOL_MAX": "1",
                   "REPOINDEX_DB_POOL_TIMEOUT": "120", "REPOINDEX_METRICS_PORT": "0"}
            queue = f"conc-{os.getpid()}"
            with environ(REDIS_URL=ep.redis_url), \
                    fleet(env, tmp, replicas=replicas, concurrency=children,
                          queue=queue) as workers:
                echo(f"{replicas} replicas x {children} children up; running {ops} at once …")
                result = concurrent_run(app, workers, queue, server.url, repos)
        finally:
            server.stop()
    result.update(replicas=replicas, children_per_replica=children, connection_budget=budget)
    return result


def bench_replicas(counts: list[int], jobs: int, files: int, runs: int,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Throughput (index operations per second) of 1, 2, 4 ... replicas of one child each
    on the same multi-job load; each count measured ``runs`` times, counts alternated."""
    from tasks.load import fleet, throughput
    from workers.app import app

    samples: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw, \
            devservices.services(f"repoindex_bench_{os.getpid()}", drop=True,
                                 own_database=True) as ep:
        tmp = Path(raw)
        echo(f"generating {jobs} repositories of {files} files …")
        repos = [make_repo(tmp / "repos" / f"r{i:03d}", files, seed=f" of {i}")
                 for i in range(jobs)]
        import psycopg

        from workers.db import migrate

        with psycopg.connect(ep.database_url) as conn:
            migrate(conn)
        env = {**os.environ, "REDIS_URL": ep.redis_url, "DATABASE_URL": ep.database_url,
               "REPOINDEX_ROOTS": str(tmp), "REPOINDEX_TEMP_DIR": str(tmp / "work"),
               "REPOINDEX_METRICS_PORT": "0"}
        with environ(REDIS_URL=ep.redis_url, DATABASE_URL=ep.database_url):
            for run in range(runs):
                for n in counts:
                    _reset(ep.database_url)
                    queue = f"rep-{n}-{run}-{os.getpid()}"
                    with fleet(env, tmp, replicas=n, concurrency=1, queue=queue,
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


def bench_all(echo: Callable[[str], None], *, quick: bool = False) -> dict[str, Any]:
    """Every benchmark once, for one table (``quick``: small sizes, for the smoke test)."""
    from tasks.soak import soak

    files, runs = (300, 1) if quick else (10_000, 3)
    doc: dict[str, Any] = {"machine": machine()}
    echo("== index")
    doc["index"] = bench_index(files, runs, echo)
    echo("== lifecycle")
    doc["lifecycle"] = bench_lifecycle(200 if quick else 2000, 3 if quick else 41, echo)
    echo("== 1,000 operations")
    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw:
        doc["volume"] = soak(100 if quick else 1000, None, 20, Path(raw) / "soak.png", echo)
    echo("== operations in flight at once")
    doc["concurrent"] = bench_concurrent(8 if quick else 100, 2 if quick else 4, echo)
    echo("== shutdown")
    doc["shutdown"] = bench_shutdown(1 if quick else 3, 5.0 if quick else 40.0,
                                     3.0 if quick else 30.0, echo)
    return doc


def machine() -> dict[str, Any]:
    import platform

    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(), "system": platform.platform(terse=True)}


def all_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The Markdown rows of ``bench all``."""
    idx, lc, vol, conc = doc["index"], doc["lifecycle"], doc["volume"], doc["concurrent"]
    sd = doc["shutdown"]["summary"]
    med = idx["median"]
    fd_growth = max((c["fd_growth_after_warmup"] for c in vol["children"].values()), default=0)
    waits = conc["pool_wait"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"<= {value * 1000:g} ms"

    return [
        ("machine", f"{doc['machine']['cpus']} CPUs, {doc['machine']['memory_gib']} GiB,"
                    f" Python {doc['machine']['python']}"),
        (f"full index of {idx['files']} files, ours / floor",
         f"{med['ours']:.2f} s / {med['floor']:.2f} s ({idx['files_per_s']:.0f} files/s)"),
        ("ratio ours / floor (target <= 1.5)", f"{idx['ratio_to_floor']:.2f}"),
        ("no-change re-index", f"{med['nochange']:.3f} s"),
        ("lifecycle overhead, on vs off (target < 5 %)",
         f"{lc['overhead_ratio'] * 100:.1f} % ({lc['paired_diff'] * 1000:.1f} ms of"
         f" {lc['median']['off'] * 1000:.0f} ms)"),
        (f"{vol['operations']} mixed operations: fd growth after warm-up (max of children)",
         str(fd_growth)),
        (f"{vol['operations']} mixed operations: server sessions (max) / temp areas left",
         f"{vol['max_server_connections']} / {vol['temp_left']}"),
        (f"{vol['operations']} mixed operations: leak warnings", str(vol["leak_warnings"])),
        (f"{conc['operations']} operations at once: succeeded",
         f"{conc['succeeded']} ({conc['waiting_together']} waiting together,"
         f" {conc['replicas']} replicas x {conc['children_per_replica']} children)"),
        (f"{conc['operations']} at once: peak server sessions / budget",
         f"{conc['peak_server_connections']} / {conc['connection_budget']}"),
        (f"{conc['operations']} at once: peak fds of a child / limit",
         f"{conc['peak_child_fds']} / {conc['fd_limit']}"),
        (f"{conc['operations']} at once: pool wait p50 / p99",
         f"{ms(waits['p50_s'])} / {ms(waits['p99_s'])}"),
        (f"{conc['operations']} at once: wall time", f"{conc['wall_s']:.1f} s"),
        ("shutdown with operations in flight, median / max",
         f"{sd['ours']['median_s']:.2f} s / {sd['ours']['max_s']:.2f} s (stock Celery:"
         f" {sd['stock']['median_s']:.2f} s, SIGKILLed {sd['stock']['sigkilled']}x)"),
        ("peak RSS growth of a child in a full index (max)",
         f"{max(idx['samples']['rss_growth']) / 2**20:.1f} MiB"),
        ("RSS after the operation / before (median)",
         f"{statistics.median(idx['samples']['rss_return']) * 100:.1f} %"),
    ]
