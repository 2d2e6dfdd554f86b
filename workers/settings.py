"""One frozen settings object, read from the environment once, at the edge.

Each setting is declared once, as a field of ``Settings``: its variable, default and
meaning (``var(...)``). ``from_env`` reads every field the same way (by its type), and
``VARIABLES`` — README's configuration table, checked row by row by a test — is derived
from the same declarations, so the three cannot drift.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from workers.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/repoindex"
DEFAULT_TEMP_DIR = Path(tempfile.gettempdir()) / "repoindex"


def var(name: str, default: Any, meaning: str, *, minimum: float = 0, shown: str | None = None,
        parse: Callable[[str], Any] | None = None) -> Any:
    """A setting: environment variable ``name``, its default (shown in README as ``shown``
    when the value itself would not say it), its meaning, and for numbers a minimum."""
    return field(default=default, metadata={
        "name": name, "meaning": meaning, "minimum": minimum, "parse": parse,
        "shown": shown if shown is not None else str(int(default) if isinstance(default, bool)
                                                      else default)})


def _roots(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).resolve() for p in raw.split(os.pathsep) if p.strip())


def _path(raw: str) -> Path:
    return Path(raw).resolve()


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise ValueError(" or ".join(allowed))
        return value
    return parse


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Typed configuration of a worker or a CLI process."""

    redis_url: str = var("REDIS_URL", DEFAULT_REDIS_URL, "Celery broker (Redis).")
    result_backend: str = var("REPOINDEX_RESULT_BACKEND", "", shown="= REDIS_URL",
                              meaning="Celery result backend (job states, results).")
    database_url: str = var("DATABASE_URL", DEFAULT_DATABASE_URL,
                            "PostgreSQL holding the index and the run ledger.")
    roots: tuple[Path, ...] = var(
        "REPOINDEX_ROOTS", (), shown="(none)", parse=_roots,
        meaning="Directories (separated by `:`) that local paths and file:// URLs must resolve "
                "under. Empty refuses every local source.")
    max_file_bytes: int = var("REPOINDEX_MAX_FILE_BYTES", 1 << 20,
                              "Files larger than this are recorded as too_large.")
    max_files: int = var("REPOINDEX_MAX_FILES", 200_000, minimum=1,
                         meaning="A tree with more entries fails with a clear error.")
    temp_dir: Path = var("REPOINDEX_TEMP_DIR", DEFAULT_TEMP_DIR,
                         shown="$TMPDIR/repoindex", parse=_path,
                         meaning="Where operations put temp files and clones.")
    git_timeout: int = var("REPOINDEX_GIT_TIMEOUT", 600, minimum=1,
                           meaning="Seconds a git process may run before it is killed.")
    concurrency: int = var("REPOINDEX_CONCURRENCY", 0, shown="(CPU count)",
                           meaning="Prefork children per worker replica.")
    visibility_timeout: int = var(
        "REPOINDEX_VISIBILITY_TIMEOUT", 3600, minimum=1,
        meaning="Seconds before Redis redelivers a job taken by a worker that vanished "
                "(SIGKILL).")
    net_timeout: int = var(
        "REPOINDEX_NET_TIMEOUT", 30, minimum=5,
        meaning="Seconds without an answer after which a TCP connection to PostgreSQL or"
                " Redis is dead (keepalives, tcp_user_timeout, socket timeouts; both ends"
                " for PostgreSQL), instead of the kernel's ~2 h on a half-open link.")
    replica_lease: float = var(
        "REPOINDEX_REPLICA_LEASE", 20.0, shown="20",
        meaning="Seconds a replica stays alive in Redis without renewing its lease (renewed"
                " every quarter of it). A replica without one is gone: a survivor returns"
                " its jobs to the queue within 1.25 x this. 0: no orphan recovery.")
    max_lost: int = var(
        "REPOINDEX_MAX_LOST", 3, minimum=1,
        meaning="A job whose worker process died this many times is failed instead of run "
                "again.")
    pool_min: int = var("REPOINDEX_DB_POOL_MIN", 1, "Connections each worker child keeps open.")
    pool_max: int = var("REPOINDEX_DB_POOL_MAX", 2, minimum=1,
                        meaning="Most connections one worker child may hold.")
    pool_max_lifetime: float = var(
        "REPOINDEX_DB_MAX_LIFETIME", 3600.0, minimum=1, shown="3600",
        meaning="Seconds a pooled connection lives before the pool replaces it.")
    pool_max_idle: float = var(
        "REPOINDEX_DB_MAX_IDLE", 600.0, minimum=1, shown="600",
        meaning="Seconds an idle connection above REPOINDEX_DB_POOL_MIN is kept open.")
    pool_timeout: int = var("REPOINDEX_DB_POOL_TIMEOUT", 30, minimum=1,
                            meaning="Seconds an operation waits for a pooled connection.")
    statement_timeout_ms: int = var("REPOINDEX_STATEMENT_TIMEOUT_MS", 5000,
                                    "Statement timeout of search queries.")
    idle_tx_timeout_ms: int = var(
        "REPOINDEX_IDLE_TX_TIMEOUT_MS", 60_000,
        "idle_in_transaction_session_timeout of our sessions (a server-side backstop).")
    result_expires: int = var(
        "REPOINDEX_RESULT_EXPIRES", 7 * 24 * 3600, minimum=1,
        meaning="Seconds Redis keeps a job's state and result (the run ledger keeps it for good).")
    max_tasks_per_child: int = var(
        "REPOINDEX_MAX_TASKS_PER_CHILD", 0,
        "A child is replaced after this many operations (0: never; memory decides).")
    max_memory_per_child_mb: int = var(
        "REPOINDEX_MAX_MEMORY_PER_CHILD_MB", 512,
        "A child whose peak RSS passed this is replaced after its operation (README: Memory).")
    sample_seconds: float = var("REPOINDEX_SAMPLE_SECONDS", 10.0, minimum=0.01, shown="10",
                                meaning="Period of each child's resource sampler.")
    leak_warmup: int = var("REPOINDEX_LEAK_WARMUP", 20,
                           "Operations per child before leak detection starts.")
    leak_window: int = var("REPOINDEX_LEAK_WINDOW", 50, minimum=2,
                           meaning="Operations per window of the memory leak detector.")
    leak_windows: int = var(
        "REPOINDEX_LEAK_WINDOWS", 3, minimum=1,
        meaning="Consecutive windows whose RSS floor must grow before a leak is suspected.")
    leak_min_growth_kb: int = var("REPOINDEX_LEAK_MIN_GROWTH_KB", 1024,
                                  "Growth of a window's RSS floor that counts.")
    tracemalloc: bool = var(
        "REPOINDEX_TRACEMALLOC", False,
        "1: trace allocations and write a top-25 diff file when a leak is suspected.")
    log_format: str = var("REPOINDEX_LOG_FORMAT", "text", parse=_choice("text", "json"),
                          meaning="`text` or `json` (one JSON object per line).")
    log_level: str = var("REPOINDEX_LOG_LEVEL", "INFO", parse=str.upper,
                         meaning="Log level of the worker and the CLI.")
    sentry_dsn: str = var("SENTRY_DSN", "", shown="(unset)",
                          meaning="Send task errors and leak warnings to Sentry when set.")
    metrics_port: int = var("REPOINDEX_METRICS_PORT", 9808,
                            "Port of each worker replica's Prometheus `/metrics` (0: off).")
    metrics_addr: str = var(
        "REPOINDEX_METRICS_ADDR", "127.0.0.1",
        "Address `/metrics` binds to; `0.0.0.0` to let a Prometheus on another host scrape.")
    flower_user: str = var("FLOWER_USER", "admin", "User name `repoindex flower` requires.")
    flower_password: str = var("FLOWER_PASSWORD", "", shown="(required)",
                               meaning="Password `repoindex flower` requires (no default).")

    def __post_init__(self) -> None:
        if not self.result_backend:  # "= REDIS_URL"
            object.__setattr__(self, "result_backend", self.redis_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every declared variable; unset or empty means the default."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["name"], "").strip()
            if raw:
                values[f.name] = _parse(f.metadata, f.default, raw)
        settings = cls(**values)
        if settings.pool_min > settings.pool_max:
            raise ConfigError("REPOINDEX_DB_POOL_MIN must not exceed REPOINDEX_DB_POOL_MAX")
        return settings


def _parse(meta: Mapping[str, Any], default: Any, raw: str) -> Any:
    name, minimum = meta["name"], meta["minimum"]
    if meta["parse"] is not None:
        try:
            return meta["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"{name} must be {exc}, got {raw!r}") from None
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int | float):
        kind = type(default)
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'},"
                              f" got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum:g}, got {value:g}")
        return value
    return raw


@cache
def process_settings() -> Settings:
    """This process's settings, read from its environment once (a worker's main process
    and, inherited through fork, its children: Celery's config, hooks, monitor, runtime)."""
    return Settings.from_env()


# (name, default as README shows it, meaning): README's configuration table, row by row.
VARIABLES: tuple[tuple[str, str, str], ...] = tuple(
    (f.metadata["name"], f.metadata["shown"], f.metadata["meaning"]) for f in fields(Settings))
