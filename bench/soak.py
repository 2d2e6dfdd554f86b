"""``repoindex bench soak``: many mixed operations through a real worker, each child
watched from outside after every batch, and every time-driven event of the fleet counted;
a table, JSON written as it goes, and a PNG plot against time.

Mixed operations, in a fixed rotation: re-index (no change), index after a commit
(changed blobs), delete then index, a failing job (bad input), a canary.

``compress=K`` divides every time-driven period of the fleet by K, so that ``--duration
15m --compress 96`` lives through a day of them (``PERIODS``): pool connections reaching
their max lifetime and max idle time, the sampler, Redis closing idle clients (a server
``timeout``, as managed Redis and proxies have), result expiry, and children recycled
after a number of operations. Leak-detector windows count operations, not time: they are
evaluated as the operations go.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.common import make_repo, workspace
from devtools.launcher import WorkerProcess
from workers.metrics import is_bookkeeping_fd

ROTATION = ("reindex", "change", "reindex", "delete", "reindex", "fail", "canary", "change",
            "reindex", "reindex")

# variable -> (uncompressed period or limit, minimum once divided): what --compress divides
PERIODS: dict[str, tuple[float, float]] = {
    "REPOINDEX_DB_MAX_LIFETIME": (3600.0, 1.0),
    "REPOINDEX_DB_MAX_IDLE": (600.0, 1.0),
    "REPOINDEX_SAMPLE_SECONDS": (10.0, 0.05),
    "REPOINDEX_RESULT_EXPIRES": (7 * 24 * 3600.0, 1.0),
    "REPOINDEX_MAX_TASKS_PER_CHILD": (20_000.0, 200.0),  # operations: a child's day, say
}
REDIS_IDLE_TIMEOUT = 300.0  # seconds; what a managed Redis or a proxy might close after
# After QUIET_AFTER times its own length of load, the load pauses for twice the
# (compressed) pool max idle time, as traffic does at night: idle connections are closed
# (the soak's pools keep none, min 0) and Redis closes its idle clients; the next operations
# reconnect. A fifth of the time is quiet (real time: 20 min after 80 min of load).
QUIET_AFTER = 4
MIN_READINGS = 5  # readings of a child before its figures after warm-up mean anything

# event -> (what it is, the period that drives it, or None when operations drive it)
EVENTS: dict[str, tuple[str, str | None]] = {
    "samples": ("resource samples taken by the children's samplers",
                "REPOINDEX_SAMPLE_SECONDS"),
    "pool_connections_opened": ("database connections opened by the pools", None),
    "pool_connections_expired": ("pool connections replaced at their max lifetime",
                                 "REPOINDEX_DB_MAX_LIFETIME"),
    "pool_connections_idle_closed": ("idle pool connections closed after max idle",
                                     "REPOINDEX_DB_MAX_IDLE"),
    "redis_reconnects": ("connections Redis accepted after the start (idle ones it closed"
                         " came back)", "redis timeout"),
    "results_expired": ("job results Redis let expire", "REPOINDEX_RESULT_EXPIRES"),
    "children_recycled": ("worker children replaced", "REPOINDEX_MAX_TASKS_PER_CHILD"),
    "leak_windows_evaluated": ("memory leak-detector windows evaluated", None),
}


def compressed_env(compress: float) -> dict[str, str]:
    """The worker environment of a run whose time-driven periods are divided by ``compress``."""
    out = {}
    for name, (period, minimum) in PERIODS.items():
        value = max(minimum, period / compress)
        out[name] = str(int(value)) if name in ("REPOINDEX_RESULT_EXPIRES",
                                                "REPOINDEX_MAX_TASKS_PER_CHILD") else f"{value:g}"
    return out


def check_plotting() -> None:
    """Before a long run: the plot at its end must be possible."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("bench soak draws its plot with matplotlib, which is not installed:"
                           " pip install -e '.[bench]'") from None


def _child_reading(pid: int) -> dict[str, int] | None:
    """RSS, USS and open fds of a child; ``sockets`` counted apart, since a soak opens and
    closes pool and Redis connections on purpose (expiry, idle close, server timeout)."""
    try:
        proc = psutil.Process(pid)
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        # the child's stats file and its sampler's /proc reads are open for a moment, and a
        # compressed soak samples often: a reading may catch them (a +1/-1 of kind path)
        links = [link for link in links if not is_bookkeeping_fd(link)]
        sockets = sum(link.startswith("socket:") for link in links)
        kinds: dict[str, int] = {}
        for link in links:
            kind = link.split(":", 1)[0] if ":" in link and not link.startswith("/") \
                else "path"
            if kind == "anon_inode":  # which: eventfd, eventpoll, timerfd, pidfd, ...
                kind = link.split(":", 1)[1].strip("[]") or kind
            kinds[kind] = kinds.get(kind, 0) + 1
        rss = int(proc.memory_info().rss)
        if not links or not rss:
            # the child is exiting (recycled or shut down): the kernel has released its
            # memory and closed its fds (every live child holds its pipes to the parent);
            # such a reading says nothing about what it holds between operations
            return None
        return {"at_ms": int(time.time() * 1000), "rss": rss,
                "uss": int(proc.memory_full_info().uss),
                "fds": len(links), "sockets": sockets, "files": len(links) - sockets,
                **{f"fd_{k}": n for k, n in kinds.items()}}
    except (psutil.NoSuchProcess, FileNotFoundError):
        return None


def _fewest(points: list[tuple[float, int, dict[str, int]]]) -> dict[str, int]:
    """The reading with the fewest non-socket fds (what the child holds between
    operations: a reading may fall inside one, whose temp files and git pipes are open)."""
    return min((r for _, _, r in points), key=lambda r: r["files"])


def _database_reading(database_url: str) -> tuple[int, dict[int, float]]:
    """In one connection: the workers' PostgreSQL sessions, and per child pid when its first
    operation that reported progress ended (the ledger's wall clock). The first progress
    report opens the child's broker connection for events (a socket, and kombu's epolls),
    which it then keeps for its life."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                           " 'repoindex' AND datname = current_database()").fetchone()
        rows = conn.execute(
            "SELECT pid, extract(epoch FROM min(finished_at)) FROM runs"
            " WHERE task = 'repoindex.index_repository' AND state = 'succeeded'"
            " AND counts->>'strategy' IN ('full', 'delta') GROUP BY pid").fetchall()
    return (int(row[0]) if row else 0,
            {int(pid): float(at) for pid, at in rows if pid is not None})


def _job(app: Any, queue: str, kind: str, repos: list[Path], i: int) -> Any:
    repo = repos[i % len(repos)]
    name = f"soak{i % len(repos)}"
    if kind == "change":
        (repo / "changing.txt").write_text(f"change {i}\n")
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=s", "-c", "user.email=s@s",
                        "commit", "-qam", f"c{i}"], check=True)
    if kind == "delete":
        app.send_task("repoindex.delete_repository", queue=queue,
                      kwargs={"name": name}).get(timeout=120)
    if kind == "fail":
        return app.send_task("repoindex.index_repository", queue=queue,
                             kwargs={"source": "/nonexistent/soak"})
    if kind == "canary":
        return app.send_task("repoindex.canary", queue=queue, kwargs={"seconds": 0})
    return app.send_task("repoindex.index_repository", queue=queue,
                         kwargs={"source": str(repo), "name": name})


class Run:
    """What a soak has measured so far; ``doc()`` is its JSON, written after every batch."""

    def __init__(self, compress: float, env: dict[str, str], redis_timeout: int) -> None:
        self.compress, self.env, self.redis_timeout = compress, env, redis_timeout
        self.reported: dict[int, float] = {}  # pid: when its first progress report ended
        self.started = time.monotonic()
        self.series: dict[int, list[tuple[float, int, dict[str, int]]]] = {}  # pid: t, ops, …
        self.sessions: list[tuple[float, int]] = []
        self.events: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self.marks: list[tuple[float, str]] = []  # (t, event) each time an event count rose
        self.done = self.failed = self.leaks = self.suspected = self.temp_left = 0
        self.leak_lines: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def update_events(self, counts: dict[str, int]) -> None:
        t = self.now()
        for name, n in counts.items():
            if n > self.events.get(name, 0):
                self.marks.append((t, name))
            self.events[name] = max(self.events.get(name, 0), n)

    def doc(self, *, finished: bool) -> dict[str, Any]:
        children = {}
        for pid, points in self.series.items():
            # after warm-up: after the first 10% of the child's readings and after its first
            # operation that reported progress (until then it holds no events connection;
            # a child that ran only unchanged re-indexes, failures, deletes and canaries for
            # its first readings opens it later, +2 epolls and its sockets)
            begun = self.reported.get(pid, float("inf"))
            after = [p for p in points[len(points) // 10:] if p[2]["at_ms"] > begun * 1000]
            warm = after or points  # figures of a child not warmed up are not judged
            quarter = max(1, len(warm) // 4)
            first, last = _fewest(warm[:quarter]), _fewest(warm[-quarter:])
            ops = [float(o) for _, o, _ in warm]
            hours = [t / 3600 for t, _, _ in warm]
            rss = [float(r["rss"]) for _, _, r in warm]
            children[str(pid)] = {
                "readings": len(points),
                # a child replaced within its first few readings has no "after warm-up"
                # (its pollers and connections open at its first operations)
                "warmed_up": len(after) >= MIN_READINGS,
                # fds other than sockets: files, pipes, eventfds (exact; any change is news),
                # the fewest of the first quarter after warm-up against those of the last
                "fd_growth_after_warmup": last["files"] - first["files"],
                # by kind (pipe, anon_inode, path, ...), in those two readings
                "fd_kinds": {k[3:]: [first.get(k, 0), last.get(k, 0)]
                             for k in sorted({*first, *last}) if k.startswith("fd_")},
                # sockets: how far their count ranged (pool and Redis connections)
                "socket_range": max(r["sockets"] for _, _, r in warm)
                - min(r["sockets"] for _, _, r in warm),
                "rss_slope_bytes_per_op": _slope(ops, rss),
                "rss_slope_bytes_per_hour": _slope(hours, rss) / self.compress,
                "max_rss_mib": max(r["rss"] for _, _, r in points) / 2**20,
                "max_uss_mib": max(r["uss"] for _, _, r in points) / 2**20,
            }
        seconds = self.now()
        return {
            "finished": finished, "seconds": round(seconds, 1), "compress": self.compress,
            "simulated_hours": round(seconds * self.compress / 3600, 2),
            "periods": {k: self.env[k] for k in PERIODS},
            "redis_idle_timeout": self.redis_timeout,
            "operations": self.done, "failed": self.failed, "leak_warnings": self.leaks,
            "suspected_memory_leaks": self.suspected, "temp_left": self.temp_left,
            "leak_lines": self.leak_lines,
            "events": dict(self.events),
            "events_expected": [e for e in EVENTS if self.expected(e, seconds)],
            "children": children,
            "max_server_connections": max((c for _, c in self.sessions), default=0),
        }

    def expected(self, event: str, seconds: float) -> bool:
        """Whether a run this long must have seen ``event`` at least once."""
        period = EVENTS[event][1]
        if period == "redis timeout":
            return seconds > 3 * self.redis_timeout
        if period == "REPOINDEX_MAX_TASKS_PER_CHILD":
            return self.done > 3 * int(self.env[period])
        if period is None:
            return event != "leak_windows_evaluated" or self.done > 400
        return seconds > 3 * float(self.env[period])


def _slope(xs: list[float], ys: list[float]) -> float:
    return statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0


def soak(ops: int, duration: float | None, batch: int, png: Path,
         echo: Callable[[str], None], *, compress: float = 1.0, rate: float = 0.0,
         json_out: Path | None = None) -> dict[str, Any]:
    """Run the soak; the JSON document goes to ``json_out`` after every batch (a run stopped
    by Ctrl-C or a crash keeps what it measured) and is returned at the end."""
    check_plotting()
    with workspace("soak", private_redis=True, REPOINDEX_DB_POOL_MIN="0",
                   **compressed_env(compress)) as ws:
        tmp, ep, env = ws.tmp, ws.endpoints, ws.env
        import redis

        server = redis.Redis.from_url(ep.redis_url)
        idle = max(1, round(REDIS_IDLE_TIMEOUT / compress))
        server.config_set("timeout", idle)
        run = Run(compress, env, idle)
        repos = [make_repo(tmp / f"repo{i}", 200) for i in range(4)]
        for repo in repos:
            (repo / "changing.txt").write_text("start\n")
            subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
            subprocess.run(["git", "-C", str(repo), "-c", "user.name=s", "-c",
                            "user.email=s@s", "commit", "-qm", "start"], check=True)
        worker = WorkerProcess(env, name=f"soak-{os.getpid()}", log_path=tmp / "w.log",
                               concurrency=2, queue=f"soak-{os.getpid()}")
        worker.start()
        app = ws.app

        accepted0 = int(server.info("stats")["total_connections_received"])
        expiry = float(env["REPOINDEX_RESULT_EXPIRES"])
        watched: list[tuple[float, str]] = []  # (sent at, job id): results to see expire
        expired: set[str] = set()
        last_stats = 0.0
        quiet = 2 * float(env["REPOINDEX_DB_MAX_IDLE"]) + 1
        run.started = time.monotonic()
        last_quiet = run.started
        try:
            while (run.done < ops) if duration is None else (run.now() < duration):
                began = time.monotonic()
                jobs = [_job(app, worker.queue or "", ROTATION[(run.done + k) % len(ROTATION)],
                             repos, run.done + k) for k in range(batch)]
                for job in jobs:
                    job.get(timeout=300, propagate=False)
                    run.failed += job.state != "SUCCESS"
                if len(watched) < 50:
                    watched.append((run.now(), jobs[0].id))
                run.done += batch
                t = run.now()
                for pid in worker.children():
                    reading = _child_reading(pid)
                    if reading is not None:
                        run.series.setdefault(pid, []).append((t, run.done, reading))
                # the ledger is read here, while the workspace's database exists (the
                # last doc() is built after it is dropped)
                sessions, run.reported = _database_reading(ep.database_url)
                run.sessions.append((t, sessions))
                for sent, job_id in watched:
                    if job_id not in expired and t - sent > expiry \
                            and not server.exists(f"celery-task-meta-{job_id}"):
                        expired.add(job_id)
                if time.monotonic() - last_stats > max(2.0, min(30.0, 60 / compress)):
                    last_stats = time.monotonic()
                    run.update_events(_fleet_events(app, worker.node) | {
                        "redis_reconnects": int(server.info("stats")[
                            "total_connections_received"]) - accepted0,
                        "results_expired": len(expired)})
                    _write(json_out, run.doc(finished=False))
                if run.done % (batch * 25) == 0:
                    echo(f"{run.done} operations in {t:.0f}s, {run.failed} failed as intended"
                         " or not")
                if rate > 0:
                    time.sleep(max(0.0, batch / rate - (time.monotonic() - began)))
                if time.monotonic() - last_quiet >= QUIET_AFTER * quiet:  # a quiet spell
                    time.sleep(min(quiet, max(0.0, (duration or quiet) - run.now())))
                    last_quiet = time.monotonic()
            run.update_events(_fleet_events(app, worker.node) | {
                "redis_reconnects": int(server.info("stats")["total_connections_received"])
                - accepted0, "results_expired": len(expired)})
            temp_root = Path(env["REPOINDEX_TEMP_DIR"])
            run.temp_left = len([n for n in os.listdir(temp_root)
                                 if n.split("-", 1)[0].isdigit()]) if temp_root.exists() else 0
            run.leaks = worker.log().count("leak op=")
            run.leak_lines = [ln for ln in worker.log().splitlines()
                              if "leak op=" in ln or "suspected memory leak" in ln][:20]
            run.suspected = worker.log().count("suspected memory leak")
        finally:
            server.close()
            worker.stop()
            _write(json_out, run.doc(finished=False))
    doc = run.doc(finished=True)
    _plot(run, png)
    doc["png"] = str(png)
    _write(json_out, doc)
    return doc


def _fleet_events(app: Any, node: str) -> dict[str, int]:
    """The replica's time-driven event counters (children's, folded) and its recycles."""
    with app.connection_for_write() as conn:  # a fresh one: Redis closes idle clients here
        replies = app.control.broadcast("repoindex_stats", reply=True, timeout=5, limit=1,
                                        destination=[node], connection=conn) or []
    for reply in replies:
        for doc in reply.values():
            totals = doc.get("totals", {})
            return {**totals.get("events", {}),
                    "children_recycled": sum(totals.get("recycles", {}).values())}
    return {}


def _write(path: Path | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def _plot(run: Run, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (3600, "h") if run.now() > 3 * 3600 else (60, "min")
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    for pid, points in run.series.items():
        xs = [t / scale for t, _, _ in points]
        axes[0].plot(xs, [r["rss"] / 2**20 for _, _, r in points], label=f"child {pid}")
        axes[1].plot(xs, [r["uss"] / 2**20 for _, _, r in points], label=f"child {pid}")
        axes[2].plot(xs, [r["fds"] for _, _, r in points], label=f"child {pid}")
    axes[3].plot([t / scale for t, _ in run.sessions], [c for _, c in run.sessions],
                 label="server sessions")
    marked = [e for e in EVENTS if e not in ("samples", "pool_connections_opened")]
    palette = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan")
    colours = dict(zip(marked, palette, strict=False))
    for ax in axes:  # each time an event count rose: a thin line in every panel
        for t, event in run.marks:
            if event in colours:
                ax.axvline(t / scale, color=colours[event], alpha=0.35, linewidth=0.8)
    for event, colour in colours.items():
        axes[0].plot([], [], color=colour, label=f"{event} ({run.events.get(event, 0)})")
    titles = ("RSS (MiB) — vertical lines: time-driven events", "USS (MiB)", "open fds",
              "PostgreSQL sessions of the fleet")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    days = f", a simulated {run.now() * run.compress / 3600:.1f} h" if run.compress != 1 else ""
    axes[3].set_xlabel(f"time ({unit}; {run.done} operations{days})")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    from matplotlib import font_manager

    # matplotlib keeps the font files it rendered with open in a cache; a benchmark that
    # leaves fds behind would be a poor advert for this project.
    cache_clear = getattr(getattr(font_manager, "_get_font", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
