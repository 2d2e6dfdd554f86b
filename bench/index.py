"""``bench index``: our full index through a real worker vs the floor (the simplest script
that reads the same files and COPYs them into the same schema), the no-change re-index,
and the worker child's peak RSS growth (VmHWM after minus VmRSS before, from /proc)."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import make_repo, reset, workspace
from devtools.launcher import WorkerProcess
from tasks.store import LINES_OF
from workers import memory


def floor_index(database_url: str, repo: Path) -> float:
    """The floor: read every tracked file and COPY blobs and files in one transaction,
    and the blobs' lines (search's rows) split by the server, as the indexer has them."""
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
        conn.execute("INSERT INTO lines " + LINES_OF.format(blobs="blobs"))
        with conn.cursor().copy("COPY files (repo_id, path, sha, mode, size, language, kind)"
                                " FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    return time.perf_counter() - started


def bench_index(files: int, runs: int, echo: Callable[[str], None]) -> dict[str, Any]:
    with workspace() as ws:
        tmp, ep = ws.tmp, ws.endpoints
        echo(f"generating a {files}-file repository …")
        repo = make_repo(tmp / "repo", files)
        worker = WorkerProcess(ws.env, name=f"bench-{os.getpid()}", log_path=tmp / "w.log",
                               concurrency=1, queue=f"bench-{os.getpid()}")
        worker.start()
        app = ws.app

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
                reset(ep.database_url)
                samples["floor"].append(floor_index(ep.database_url, repo))
                reset(ep.database_url)
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
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"files": files, "runs": runs, "median": med, "samples": samples,
            "files_per_s": files / med["ours"], "floor_files_per_s": files / med["floor"],
            "ratio_to_floor": med["ours"] / med["floor"]}
