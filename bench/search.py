"""``repoindex bench search``: our search against ``git grep`` and ripgrep on one checkout.

The source (default: the repository of the current directory) is copied into a workspace
and indexed by a real worker; then, for a fixed set of patterns, side by side in one run:
the in-process median of :func:`tasks.search.search` (every match, limit 1,000,000), the
whole ``repoindex search`` process, ``git grep -n`` on the checkout and ``rg -n`` when
installed. Then the corpus grows and the in-process medians are taken again: to
``--copies`` times (copies whose every file differs by one line, so no blob is shared: every
match, and every line a rare literal's trigrams point at, is there ``copies`` times), or with
``--grow-with`` directories (other code: a rare literal stays rare; the factor is the number
of lines after over before).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import GIT, machine, workspace
from devtools.launcher import WorkerProcess

# (name, pattern, regex, ignore case): rare and common literals, -i, regexes, anchored,
# patterns without trigrams
PATTERNS: list[tuple[str, str, bool, bool]] = [
    ("rare literal", "zzyzx_no_such_string", False, False),
    ("rare literal", "keep_statistics", False, False),
    ("rare literal", "SYMLINK_MAX", False, False),
    ("rare literal", "newline_sensitive", False, False),
    ("rare literal", "gin_trgm_ops", False, False),
    ("rare literal", "ScrubbedRequest", False, False),
    ("common literal", "import", False, False),
    ("common literal", "self", False, False),
    ("common literal", "return", False, False),
    ("common literal", "def ", False, False),
    ("common literal", "settings", False, False),
    ("-i literal", "resourcemanager", False, True),
    ("-i literal", "todo", False, True),
    ("-i literal", "POSTGRESQL", False, True),
    ("regex", r"def \w+_timeout", True, False),
    ("regex", r"[0-9]{4,}", True, False),
    ("regex", r"(psycopg|kombu)\.\w+", True, False),
    ("regex", r"\ytimeout\y", True, False),
    ("regex -i", r"sigterm|sigkill", True, True),
    ("anchored", r"^import os$", True, False),
    ("anchored", r"^def \w+\(", True, False),
    ("anchored", r"^class ", True, False),
    ("anchored", r"\)$", True, False),
    ("anchored", r"^#", True, False),
    ("two characters", "os", False, False),
    ("two characters", "->", False, False),
]


def _median_time(run: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _copy(source: Path, target: Path, tag: str | None) -> Path:
    """A clone of ``source``'s HEAD; with ``tag``, every file gets one more line (new blobs)."""
    subprocess.run([*GIT, "clone", "-q", "--no-local", str(source), str(target)], check=True)
    if tag is not None:
        listed = subprocess.run(["git", "-C", str(target), "ls-files", "-z"], check=True,
                                capture_output=True).stdout.split(b"\0")
        for name in filter(None, listed):
            path = target / os.fsdecode(name)
            if path.is_file() and not path.is_symlink():
                with open(path, "ab") as f:
                    f.write(f"\n# copy {tag}\n".encode())
        subprocess.run([*GIT, "-C", str(target), "commit", "-qam", f"copy {tag}"], check=True)
    return target


def _tree(source: Path, target: Path) -> Path:
    """``source`` as a repository of its own: a clone of a repository's HEAD, or a
    directory's files (caches and symlinks left out) committed into a new one."""
    if (source / ".git").exists():
        return _copy(source, target, None)
    shutil.copytree(source, target, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    for path in list(target.rglob("*")):
        if path.is_symlink():
            path.unlink()
    subprocess.run(["git", "-C", str(target), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(target), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(target), "commit", "-qm", f"{source}"], check=True)
    return target


def _peers(repo: Path, pattern: str, regex: bool, ignore_case: bool) -> dict[str, list[str]]:
    git = ["git", "-C", str(repo), "grep", "-n", "-I", "-E" if regex else "-F"]
    rg = ["rg", "-n", "--no-config", *(() if regex else ("-F",))]
    if ignore_case:
        git.append("-i")
        rg.append("-i")
    peers = {"git grep": [*git, "-e", pattern]}
    if shutil.which("rg") and not regex:  # rg's dialect differs from ARE: literals only
        peers["rg"] = [*rg, "-e", pattern, str(repo)]
    return peers


def _measure(conn: Any, repo: Path, env: dict[str, str],
             spec: tuple[str, str, bool, bool], runs: int, echo: Callable[[str], None]
             ) -> dict[str, Any]:
    """One pattern, side by side: in-process, the CLI process, git grep, rg."""
    from tasks.search import MAX_LIMIT, search

    kind, pattern, regex, ic = spec
    ours = partial(search, conn, pattern, regex=regex, ignore_case=ic, limit=MAX_LIMIT,
                   timeout_ms=60_000)
    row: dict[str, Any] = {"kind": kind, "pattern": pattern, "regex": regex,
                           "ignore_case": ic, "matches": len(ours()),
                           "ours": _median_time(ours, runs)}
    flags = [*(["--regex"] if regex else []), *(["-i"] if ic else [])]
    cli = [sys.executable, "-m", "cli", "search", "--limit", str(MAX_LIMIT), *flags, "--",
           pattern]
    peers = {"cli": (cli, env), **{k: (v, None) for k, v in _peers(repo, pattern, regex,
                                                                      ic).items()}}
    for peer, (argv, peer_env) in peers.items():
        row[peer] = _median_time(partial(subprocess.run, argv, env=peer_env,
                                         capture_output=True, check=False), max(3, runs // 3))
    echo(f"{kind:15} {pattern!r:26} {row['matches']:7d} matches  ours "
         f"{row['ours'] * 1000:7.1f} ms  git grep {row['git grep'] * 1000:7.1f} ms")
    return row


def bench_search(source: Path, copies: int, runs: int, echo: Callable[[str], None],
                 grow_with: Sequence[Path] = ()) -> dict[str, Any]:
    from tasks.search import MAX_LIMIT, search
    from workers.db import connect
    from workers.settings import Settings

    with workspace("search") as ws:
        worker = WorkerProcess(ws.env, name=f"bench-search-{os.getpid()}",
                               log_path=ws.tmp / "w.log", concurrency=2,
                               queue=f"bench-search-{os.getpid()}")
        worker.start()
        app = ws.app

        def index(repo: Path, name: str) -> None:
            app.send_task("repoindex.index_repository", queue=worker.queue,
                          kwargs={"source": str(repo), "name": name}).get(timeout=3600)

        try:
            base = _copy(source, ws.tmp / "copy-0", None)
            echo(f"indexing {source} …")
            index(base, "copy-0")
            conn = connect(Settings.from_env(), autocommit=True)
            rows = [_measure(conn, base, ws.env, p, runs, echo) for p in PATTERNS]
            size = conn.execute(
                "SELECT pg_relation_size('lines_trgm'), pg_total_relation_size('blobs'),"
                " (SELECT count(*) FROM blobs), pg_total_relation_size('lines'),"
                " (SELECT count(*) FROM lines)").fetchone()
            if grow_with:
                echo(f"growing the corpus with {len(grow_with)} other trees …")
                for n, tree in enumerate(grow_with, 1):
                    index(_tree(tree, ws.tmp / f"grow-{n}"), f"grow-{n}-{tree.name}")
            else:
                echo(f"growing the corpus to {copies}x …")
                for n in range(1, copies):
                    index(_copy(source, ws.tmp / f"copy-{n}", str(n)), f"copy-{n}")
            grown = conn.execute("SELECT count(*) FROM lines").fetchone()
            for row, (_, pattern, regex, ic) in zip(rows, PATTERNS, strict=True):
                row["ours_grown"] = _median_time(partial(
                    search, conn, pattern, regex=regex, ignore_case=ic, limit=MAX_LIMIT,
                    timeout_ms=60_000), runs)
            conn.close()
        finally:
            worker.stop()
    assert size is not None and grown is not None
    factor = int(grown[0]) / max(1, int(size[4]))
    return {"machine": machine(), "source": str(source), "runs": runs, "copies": copies,
            "grown_with": [str(t) for t in grow_with], "growth_factor": factor,
            "patterns": rows, "index_bytes": int(size[0]), "blobs_bytes": int(size[1]),
            "blobs": int(size[2]), "lines_bytes": int(size[3]), "lines": int(size[4]),
            "summary": summarize(rows)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    def med(key: str, only: str | None = None) -> float:
        values = [r[key] for r in rows if key in r and (only is None or r["kind"] == only)]
        return statistics.median(values) if values else float("nan")

    def ratio(key: str, peer: str, only: str | None = None) -> float:
        values = [r[key] / r[peer] for r in rows
                  if peer in r and key in r and (only is None or r["kind"] == only)]
        return statistics.median(values) if values else float("nan")

    return {"ours_over_git_rare": ratio("ours", "git grep", "rare literal"),
            "ours_over_git_all": ratio("ours", "git grep"),
            "cli_over_git_all": ratio("cli", "git grep"),
            "ours_over_rg_literals": ratio("ours", "rg"),
            "median_ours_ms": med("ours") * 1000, "median_git_ms": med("git grep") * 1000,
            "median_cli_ms": med("cli") * 1000,
            "median_rg_ms": med("rg") * 1000,
            "growth_rare": ratio("ours_grown", "ours", "rare literal"),
            "growth_all": ratio("ours_grown", "ours")}
