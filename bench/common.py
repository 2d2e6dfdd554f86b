"""What every benchmark shares: one set-up (``workspace``), generated repositories, and
the table/JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools import devservices

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


@dataclass(frozen=True)
class Workspace:
    """A benchmark's temp directory, its services, and the environment of its workers."""

    tmp: Path
    endpoints: devservices.Endpoints
    env: dict[str, str]
    app: Any  # a producer (celery.Celery) bound to this workspace's Redis


def producer(redis_url: str) -> Any:
    """A Celery producer for ``redis_url``: ``workers.app`` is configured once, from the
    environment at its import, so a benchmark whose workspace has a Redis of its own (a
    private or throwaway server) would send its jobs to an earlier workspace's Redis."""
    from celery import Celery

    app = Celery("repoindex", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    return app


@contextlib.contextmanager
def workspace(kind: str = "bench", *, private_redis: bool = False,
              **extra: str) -> Iterator[Workspace]:
    """The one set-up of every benchmark: a temp directory, Redis and a PostgreSQL database
    of our own (dropped afterwards), this process's REDIS_URL and DATABASE_URL pointing at
    them for the block, and ``env`` for workers (roots and temp dir inside the directory,
    plus ``extra``). ``private_redis``: a redis-server of its own even when one is configured
    (a benchmark that changes the server's settings)."""
    with tempfile.TemporaryDirectory(prefix=f"repoindex-{kind}-") as raw, \
            devservices.services(f"repoindex_{kind}_{os.getpid()}", drop=True,
                                 own_database=True, private_redis=private_redis) as ep, \
            environ(REDIS_URL=ep.redis_url, DATABASE_URL=ep.database_url):
        tmp = Path(raw)
        app = producer(ep.redis_url)
        try:
            yield Workspace(tmp, ep, {**os.environ, "REPOINDEX_ROOTS": str(tmp),
                                      "REPOINDEX_TEMP_DIR": str(tmp / "work"), **extra}, app)
        finally:
            app.close()


def migrated(database_url: str) -> None:
    """Apply the schema migrations to ``database_url``."""
    import psycopg

    from workers.db import migrate

    with psycopg.connect(database_url) as conn:
        migrate(conn)


def make_repo(path: Path, files: int, seed: str = "", *, packed: bool = False) -> Path:
    """``files`` source-like files of 0.5 to 3 KiB in nested folders, committed; repositories
    of different ``seed`` share no blob. Git's automatic gc is off (it would pack the
    objects in the background while a benchmark measures); ``packed`` packs them first,
    as a clone or a repository git has gc'd holds them."""
    subprocess.run([*GIT, "init", "-q", str(path)], check=True)
    subprocess.run([*GIT, "-C", str(path), "config", "gc.auto", "0"], check=True)
    for i in range(files):
        target = path / f"pkg{i % 20}" / f"mod{i % 13}" / f"file_{i}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n"
                       for j in range(10 + i % 60))
        target.write_text(f"# generated file {i}{seed}\n{body}")
    subprocess.run([*GIT, "-C", str(path), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(path), "commit", "-qm", "bench"], check=True)
    if packed:
        subprocess.run([*GIT, "-C", str(path), "gc", "--quiet"], check=True)
    return path


def reset(database_url: str) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE repositories, files, blobs, lines, runs")


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    out += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(out)


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2, default=str))


def machine() -> dict[str, Any]:
    import platform

    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(), "system": platform.platform(terse=True)}
