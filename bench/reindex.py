"""``bench reindex``: what a re-index costs at several repository sizes, side by side in one
run through one real worker: the full index against its read+COPY floor (``bench index``'s
floor), a no-change re-index, a 3-file change and a 1 % change (each a new commit), and
the slope of a change's time against the files it changes."""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import GIT, make_repo, reset, workspace
from bench.index import floor_index
from devtools.launcher import WorkerProcess


def change(repo: Path, files: int, count: int, run: int) -> None:
    """Edit ``count`` files spread evenly over the repository and commit them."""
    step = max(1, files // count)
    for i in range(0, step * count, step):
        path = repo / f"pkg{i % 20}" / f"mod{i % 13}" / f"file_{i}.py"
        with open(path, "a") as f:
            f.write(f"# edit {run}\n")
    subprocess.run([*GIT, "-C", str(repo), "commit", "-qam", f"edit {run}"], check=True)


def slope(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``seconds = fixed + per_file * files``: (fixed, per_file)."""
    fit = statistics.linear_regression([float(n) for n, _ in points], [t for _, t in points])
    return fit.intercept, fit.slope


def bench_reindex(sizes: Sequence[int], runs: int, echo: Callable[[str], None]
                  ) -> dict[str, Any]:
    with workspace("reindex") as ws:
        worker = WorkerProcess(ws.env, name=f"bench-{os.getpid()}", log_path=ws.tmp / "w.log",
                               concurrency=1, queue=f"bench-{os.getpid()}")
        worker.start()

        def index(repo: Path, name: str) -> dict[str, Any]:
            job = ws.app.send_task("repoindex.index_repository", queue=worker.queue,
                                   kwargs={"source": str(repo), "name": name})
            return job.get(timeout=3600)  # type: ignore[no-any-return]

        results: dict[int, dict[str, Any]] = {}
        try:
            index(make_repo(ws.tmp / "warm", 20), "warm")
            for files in sizes:
                echo(f"generating a {files}-file repository …")
                repo = make_repo(ws.tmp / f"repo{files}", files, packed=True)
                reset(ws.endpoints.database_url)
                floor = floor_index(ws.endpoints.database_url, repo)
                reset(ws.endpoints.database_url)
                full = index(repo, "r")
                row: dict[str, Any] = {"floor": floor, "full": full["seconds"],
                                       "ratio": full["seconds"] / floor}
                echo(f"{files}: full {full['seconds']:.2f}s floor {floor:.2f}s")
                for what, count in (("nochange", 0), ("3 files", 3),
                                    ("1 %", max(1, files // 100))):
                    samples, strategies = [], set()
                    for run in range(runs):
                        if count:
                            change(repo, files, count, run)
                        result = index(repo, "r")
                        assert result["indexed"] == count, result
                        samples.append(result["seconds"])
                        strategies.add(result["strategy"])
                    row[what] = {"median": statistics.median(samples), "samples": samples,
                                 "changed": count, "strategy": sorted(strategies)}
                    echo(f"{files}: {what} {row[what]['median'] * 1000:.1f} ms "
                         f"({', '.join(sorted(strategies))})")
                results[files] = row
                reset(ws.endpoints.database_url)
        finally:
            worker.stop()
    for row in results.values():  # the time each further changed file adds, at this size
        small, large = row["3 files"], row["1 %"]
        row["per_changed_file_s"] = ((large["median"] - small["median"])
                                     / max(1, large["changed"] - small["changed"]))
    fixed, per_file = slope([(row[w]["changed"], row[w]["median"]) for row in results.values()
                             for w in ("3 files", "1 %")])
    # a 3-file change against the repository's size: what the repository adds to a change
    _, per_repo_file = (slope([(n, row["3 files"]["median"]) for n, row in results.items()])
                        if len(results) > 1 else (0.0, 0.0))
    return {"sizes": list(sizes), "runs": runs, "results": results,
            "slope": {"fixed_s": fixed, "per_changed_file_s": per_file,
                      "three_files_per_100k_repo_files_s": per_repo_file * 100_000}}
