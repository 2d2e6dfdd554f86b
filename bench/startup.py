"""``bench startup``: how long each console command takes, start to exit, against one worker
replica of a workspace of its own (issue 16's targets beside each), with its CPU time."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import make_repo, workspace
from devtools.launcher import WorkerProcess

TARGETS_MS = {"status (finished job)": 300, "status (unknown id)": 300, "repos": 300,
              "enqueue": 300, "stats": 1500, "search": 150}


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall and CPU (user + sys) seconds of one run of ``argv``, and its exit status."""
    began = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return time.perf_counter() - began, usage.ru_utime + usage.ru_stime, proc.returncode


def bench_startup(runs: int, echo: Callable[[str], None],
                  against: str | None = None) -> dict[str, Any]:
    """``against``: another installation's console script (an earlier version in a venv of
    its own), timed in the same rounds, alternately, as the peer."""
    exe = str(Path(sys.executable).parent / "repoindex")  # the console script
    with workspace("startup") as ws:
        repo = make_repo(ws.tmp / "repo", 50)
        # a queue of its own: another worker on the same Redis (with other roots) must not
        # take the job whose status is timed
        name = f"startup-{os.getpid()}"
        worker = WorkerProcess(ws.env, name=name, queue=name, log_path=ws.tmp / "w.log",
                               concurrency=1).start()
        try:
            job = ws.app.send_task("repoindex.index_repository", queue=worker.queue,
                                   kwargs={"source": str(repo), "name": "startup"})
            job.get(timeout=120)
            sides = {"ours": _commands(exe, job.id, repo)}
            if against:
                sides["against"] = _commands(against, job.id, repo)
            echo(f"{len(sides['ours'])} commands, {runs} rounds (each command once per round)")
            samples: dict[str, dict[str, list[tuple[float, float, int]]]] = {
                side: {k: [] for k in commands} for side, commands in sides.items()}
            for _ in range(runs):  # round-robin: drift spreads over every command alike
                for name in sides["ours"]:
                    for side, commands in sides.items():
                        samples[side][name].append(_timed(commands[name], ws.env))
        finally:
            worker.stop()
    doc: dict[str, Any] = {"runs": runs, "load_average": os.getloadavg(), "against": against}
    for side, by_name in samples.items():
        doc["commands" if side == "ours" else "against_commands"] = {
            name: {"wall_ms": statistics.median(w for w, _, _ in s) * 1000,
                   "cpu_ms": statistics.median(c for _, c, _ in s) * 1000,
                   "exit_codes": sorted({code for _, _, code in s}),
                   "target_ms": TARGETS_MS.get(name)}
            for name, s in by_name.items()}
    return doc


def _commands(exe: str, job_id: str, repo: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": [str(Path(exe).parent / "python"), "-c", "pass"],
        "--help": [exe, "--help"],
        "status (finished job)": [exe, "status", job_id],
        "status (unknown id)": [exe, "status", "not-a-job-id"],
        "repos": [exe, "repos"],
        "search": [exe, "search", "def function_7_3(x)"],  # one match
        "enqueue": [exe, "enqueue", str(repo), "--name", "again"],
        "stats": [exe, "stats"],
    }
