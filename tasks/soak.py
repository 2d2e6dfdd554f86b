"""``repoindex bench soak``: many mixed operations through a real worker, each child
watched from outside after every batch; a table, JSON and a PNG plot.

Mixed operations, in a fixed rotation: re-index (no change), index after a commit
(changed blobs), delete then index, a failing job (bad input), a canary.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from workers import devservices

ROTATION = ("reindex", "change", "reindex", "delete", "reindex", "fail", "canary", "change",
            "reindex", "reindex")


def _child_reading(pid: int) -> dict[str, int] | None:
    try:
        proc = psutil.Process(pid)
        return {"rss": int(proc.memory_info().rss), "uss": int(proc.memory_full_info().uss),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (psutil.NoSuchProcess, FileNotFoundError):
        return None


def _connections(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                           " 'repoindex' AND datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def _job(app: Any, queue: str, kind: str, repos: list[Path], i: int) -> Any:
    import subprocess

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


def soak(ops: int, duration: float | None, batch: int, png: Path,
         echo: Callable[[str], None]) -> dict[str, Any]:
    from tasks.bench import environ, make_repo
    from workers.launcher import WorkerProcess

    with tempfile.TemporaryDirectory(prefix="repoindex-soak-") as raw, \
            devservices.services(f"repoindex_soak_{os.getpid()}", drop=True,
                                 own_database=True) as ep, \
            environ(REDIS_URL=ep.redis_url, DATABASE_URL=ep.database_url):
        tmp = Path(raw)
        repos = [make_repo(tmp / f"repo{i}", 200) for i in range(4)]
        for repo in repos:
            (repo / "changing.txt").write_text("start\n")
        env = {**os.environ, "REPOINDEX_ROOTS": str(tmp), "REPOINDEX_TEMP_DIR": str(tmp / "w")}
        worker = WorkerProcess(env, name=f"soak-{os.getpid()}", log_path=tmp / "w.log",
                               concurrency=2, queue=f"soak-{os.getpid()}")
        worker.start()
        for repo in repos:
            import subprocess

            subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
            subprocess.run(["git", "-C", str(repo), "-c", "user.name=s", "-c",
                            "user.email=s@s", "commit", "-qm", "start"], check=True)
        from workers.app import app

        series: dict[int, list[tuple[int, dict[str, int]]]] = {}
        conns: list[tuple[int, int]] = []
        done, failed, started = 0, 0, time.monotonic()
        try:
            while (done < ops) if duration is None else (time.monotonic() - started < duration):
                jobs = [_job(app, worker.queue or "", ROTATION[(done + k) % len(ROTATION)],
                             repos, done + k) for k in range(batch)]
                for job in jobs:
                    job.get(timeout=300, propagate=False)
                    failed += job.state != "SUCCESS"
                done += batch
                for pid in worker.children():
                    reading = _child_reading(pid)
                    if reading is not None:
                        series.setdefault(pid, []).append((done, reading))
                conns.append((done, _connections(ep.database_url)))
                if done % (batch * 25) == 0:
                    echo(f"{done} operations, {failed} failed as intended or not")
            temp_root = Path(env["REPOINDEX_TEMP_DIR"])
            temp_left = [n for n in os.listdir(temp_root) if n.split("-", 1)[0].isdigit()] \
                if temp_root.exists() else []
            leaks = worker.log().count("leak op=")
            suspected = worker.log().count("suspected memory leak")
        finally:
            worker.stop()
    summary = _summarise(series, conns, done, failed, leaks, suspected, png)
    summary["temp_left"] = len(temp_left)
    return summary


def _summarise(series: dict[int, list[tuple[int, dict[str, int]]]],
               conns: list[tuple[int, int]], done: int, failed: int, leaks: int,
               suspected: int, png: Path) -> dict[str, Any]:
    children = {}
    for pid, points in series.items():
        warm = points[len(points) // 10:] or points  # after warm-up: the first 10%
        xs = [float(x) for x, _ in warm]
        ys = [float(r["rss"]) for _, r in warm]
        slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0
        children[pid] = {
            "operations_seen": len(points),
            "fd_growth_after_warmup": warm[-1][1]["fds"] - warm[0][1]["fds"],
            "rss_slope_bytes_per_op": slope,
            "max_rss_mib": max(r["rss"] for _, r in points) / 2**20,
            "max_uss_mib": max(r["uss"] for _, r in points) / 2**20,
        }
    _plot(series, conns, png)
    return {"operations": done, "failed": failed, "leak_warnings": leaks,
            "suspected_memory_leaks": suspected, "children": children,
            "max_server_connections": max((c for _, c in conns), default=0), "png": str(png)}


def _plot(series: dict[int, list[tuple[int, dict[str, int]]]],
          conns: list[tuple[int, int]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for pid, points in series.items():
        xs = [x for x, _ in points]
        axes[0].plot(xs, [r["rss"] / 2**20 for _, r in points], label=f"child {pid}")
        axes[1].plot(xs, [r["uss"] / 2**20 for _, r in points], label=f"child {pid}")
        axes[2].plot(xs, [r["fds"] for _, r in points], label=f"child {pid}")
    axes[3].plot([x for x, _ in conns], [c for _, c in conns], label="server sessions")
    for ax, title in zip(axes, ("RSS (MiB)", "USS (MiB)", "open fds",
                                "PostgreSQL sessions of the fleet (pool usage)"), strict=True):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    axes[3].set_xlabel("operations")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    from matplotlib import font_manager

    # matplotlib keeps the font files it rendered with open in a cache; a benchmark that
    # leaves fds behind would be a poor advert for this project.
    cache_clear = getattr(getattr(font_manager, "_get_font", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
