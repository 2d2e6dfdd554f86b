"""One frozen settings object, read from the environment once, at the edge.

Every environment variable the product reads is listed in ``VARIABLES`` (name, default,
meaning); README's configuration table is generated from it, so the two cannot drift.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from workers.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/repoindex"

# (name, default, meaning) — the single source of README's configuration table.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("REDIS_URL", DEFAULT_REDIS_URL, "Celery broker (Redis)."),
    ("REPOINDEX_RESULT_BACKEND", "= REDIS_URL", "Celery result backend (job states, results)."),
    ("DATABASE_URL", DEFAULT_DATABASE_URL, "PostgreSQL holding the index and the run ledger."),
    ("REPOINDEX_ROOTS", "(none)",
     "Directories (separated by `:`) that local paths and file:// URLs must resolve under. "
     "Empty refuses every local source."),
    ("REPOINDEX_MAX_FILE_BYTES", "1048576", "Files larger than this are recorded as too_large."),
    ("REPOINDEX_MAX_FILES", "200000", "A tree with more entries fails with a clear error."),
    ("REPOINDEX_TEMP_DIR", "$TMPDIR/repoindex", "Where operations put temp files and clones."),
    ("REPOINDEX_GIT_TIMEOUT", "600", "Seconds a git process may run before it is killed."),
    ("REPOINDEX_CONCURRENCY", "(CPU count)", "Prefork children per worker replica."),
    ("REPOINDEX_VISIBILITY_TIMEOUT", "3600",
     "Seconds before Redis redelivers a job taken by a worker that vanished (SIGKILL)."),
    ("REPOINDEX_MAX_LOST", "3",
     "A job whose worker process died this many times is failed instead of run again."),
    ("REPOINDEX_DB_POOL_MIN", "1", "Connections each worker child keeps open."),
    ("REPOINDEX_DB_POOL_MAX", "2", "Most connections one worker child may hold."),
    ("REPOINDEX_DB_POOL_TIMEOUT", "30", "Seconds an operation waits for a pooled connection."),
    ("REPOINDEX_STATEMENT_TIMEOUT_MS", "5000", "Statement timeout of search queries."),
    ("REPOINDEX_IDLE_TX_TIMEOUT_MS", "60000",
     "idle_in_transaction_session_timeout of our sessions (a server-side backstop)."),
    ("REPOINDEX_MAX_MEMORY_PER_CHILD_MB", "512",
     "A child whose peak RSS passed this is replaced after its operation (README: Memory)."),
    ("REPOINDEX_SAMPLE_SECONDS", "10", "Period of each child's resource sampler."),
    ("REPOINDEX_LEAK_WARMUP", "20", "Operations per child before leak detection starts."),
    ("REPOINDEX_LEAK_WINDOW", "50", "Operations per window of the memory leak detector."),
    ("REPOINDEX_LEAK_WINDOWS", "3",
     "Consecutive windows whose RSS floor must grow before a leak is suspected."),
    ("REPOINDEX_LEAK_MIN_GROWTH_KB", "1024", "Growth of a window's RSS floor that counts."),
    ("REPOINDEX_TRACEMALLOC", "0",
     "1: trace allocations and write a top-25 diff file when a leak is suspected."),
    ("REPOINDEX_LOG_FORMAT", "text", "`text` or `json` (one JSON object per line)."),
    ("REPOINDEX_LOG_LEVEL", "INFO", "Log level of the worker and the CLI."),
    ("SENTRY_DSN", "(unset)", "Send task errors and leak warnings to Sentry when set."),
    ("REPOINDEX_METRICS_PORT", "9808",
     "Port of each worker replica's Prometheus `/metrics` (0: off)."),
    ("REPOINDEX_METRICS_ADDR", "127.0.0.1",
     "Address `/metrics` binds to; `0.0.0.0` to let a Prometheus on another host scrape."),
    ("FLOWER_USER", "admin", "User name `repoindex flower` requires."),
    ("FLOWER_PASSWORD", "(required)", "Password `repoindex flower` requires (no default)."),
)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _roots(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).resolve() for p in raw.split(os.pathsep) if p.strip())


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Typed configuration of a worker or a CLI process."""

    redis_url: str = DEFAULT_REDIS_URL
    result_backend: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    roots: tuple[Path, ...] = ()
    max_file_bytes: int = 1 << 20
    max_files: int = 200_000
    temp_dir: Path = Path(tempfile.gettempdir()) / "repoindex"
    git_timeout: int = 600
    concurrency: int = 0  # 0: Celery's default (number of CPUs)
    visibility_timeout: int = 3600
    max_lost: int = 3
    pool_min: int = 1
    pool_max: int = 2
    pool_timeout: int = 30
    statement_timeout_ms: int = 5000
    idle_tx_timeout_ms: int = 60_000
    max_memory_per_child_mb: int = 512
    sample_seconds: float = 10.0
    leak_warmup: int = 20
    leak_window: int = 50
    leak_windows: int = 3
    leak_min_growth_kb: int = 1024
    tracemalloc: bool = False
    log_format: str = "text"
    log_level: str = "INFO"
    sentry_dsn: str = ""
    metrics_port: int = 9808
    metrics_addr: str = "127.0.0.1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable of ``VARIABLES``."""
        env = os.environ if env is None else env
        redis_url = env.get("REDIS_URL") or DEFAULT_REDIS_URL
        pool_min = _int(env, "REPOINDEX_DB_POOL_MIN", 1)
        pool_max = _int(env, "REPOINDEX_DB_POOL_MAX", 2, minimum=1)
        if pool_min > pool_max:
            raise ConfigError("REPOINDEX_DB_POOL_MIN must not exceed REPOINDEX_DB_POOL_MAX")
        log_format = env.get("REPOINDEX_LOG_FORMAT", "text").strip().lower() or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"REPOINDEX_LOG_FORMAT must be text or json, got {log_format!r}")
        temp_raw = env.get("REPOINDEX_TEMP_DIR", "").strip()
        return cls(
            redis_url=redis_url,
            result_backend=env.get("REPOINDEX_RESULT_BACKEND") or redis_url,
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            roots=_roots(env.get("REPOINDEX_ROOTS", "")),
            max_file_bytes=_int(env, "REPOINDEX_MAX_FILE_BYTES", 1 << 20),
            max_files=_int(env, "REPOINDEX_MAX_FILES", 200_000, minimum=1),
            temp_dir=Path(temp_raw).resolve() if temp_raw else cls.temp_dir,
            git_timeout=_int(env, "REPOINDEX_GIT_TIMEOUT", 600, minimum=1),
            concurrency=_int(env, "REPOINDEX_CONCURRENCY", 0),
            visibility_timeout=_int(env, "REPOINDEX_VISIBILITY_TIMEOUT", 3600, minimum=1),
            max_lost=_int(env, "REPOINDEX_MAX_LOST", 3, minimum=1),
            pool_min=pool_min,
            pool_max=pool_max,
            pool_timeout=_int(env, "REPOINDEX_DB_POOL_TIMEOUT", 30, minimum=1),
            statement_timeout_ms=_int(env, "REPOINDEX_STATEMENT_TIMEOUT_MS", 5000),
            idle_tx_timeout_ms=_int(env, "REPOINDEX_IDLE_TX_TIMEOUT_MS", 60_000),
            max_memory_per_child_mb=_int(env, "REPOINDEX_MAX_MEMORY_PER_CHILD_MB", 512),
            sample_seconds=float(_int(env, "REPOINDEX_SAMPLE_SECONDS", 10, minimum=1)),
            leak_warmup=_int(env, "REPOINDEX_LEAK_WARMUP", 20),
            leak_window=_int(env, "REPOINDEX_LEAK_WINDOW", 50, minimum=2),
            leak_windows=_int(env, "REPOINDEX_LEAK_WINDOWS", 3, minimum=1),
            leak_min_growth_kb=_int(env, "REPOINDEX_LEAK_MIN_GROWTH_KB", 1024),
            tracemalloc=env.get("REPOINDEX_TRACEMALLOC", "0").strip() in ("1", "true", "yes"),
            log_format=log_format,
            log_level=(env.get("REPOINDEX_LOG_LEVEL") or "INFO").upper(),
            sentry_dsn=env.get("SENTRY_DSN", "").strip(),
            metrics_port=_int(env, "REPOINDEX_METRICS_PORT", 9808),
            metrics_addr=env.get("REPOINDEX_METRICS_ADDR", "").strip() or "127.0.0.1",
        )
