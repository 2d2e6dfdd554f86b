"""Redis and PostgreSQL for the demo and the tests, found or started.

Order of preference: the URL in the environment; the local default server when it
answers; a throwaway server started from the binaries on PATH in a temporary directory
and removed afterwards. A missing binary is reported with what to install.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from workers.errors import ConfigError

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://127.0.0.1:5432/postgres"
INSTALL_HINT = {
    "redis-server": "install Redis (Debian/Ubuntu: apt-get install redis-server; "
                    "macOS: brew install redis) or set REDIS_URL",
    "postgres": "install PostgreSQL >= 13 (Debian/Ubuntu: apt-get install postgresql; "
                "macOS: brew install postgresql) or set DATABASE_URL",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` unless it exists; return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip()
        candidates.insert(0, os.path.join(bindir, name))
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    hint = INSTALL_HINT["redis-server" if name.startswith("redis") else "postgres"]
    raise ConfigError(f"{name} was not found on PATH: {hint}")


class RedisServer:
    """A private redis-server on a free port of ``host`` (loopback unless a test's network
    says otherwise); ``restart()`` keeps the port."""

    def __init__(self, directory: Path, port: int | None = None, *,
                 persistent: bool = False, fsync: str = "always",
                 host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.host = host
        self.persistent = persistent  # append-only file: survives restarts
        self.fsync = fsync  # appendfsync: always, or everysec as docker-compose.yml ships
        self.port = port or free_port()
        self.url = f"redis://{host}:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._proc = subprocess.Popen(
            [find_binary("redis-server"), "--port", str(self.port), "--bind", self.host,
             "--save", "", "--appendonly", "yes" if self.persistent else "no",
             "--appendfsync", self.fsync, "--dir", str(self.directory),
             # without a password Redis answers only loopback clients unless told otherwise
             *(("--protected-mode", "no") if self.host != "127.0.0.1" else ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: redis_answers(self.url), f"redis-server on port {self.port}")
        except ConfigError:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a host crash would: no shutdown save."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None


class PostgresServer:
    """A throwaway PostgreSQL cluster (run as an unprivileged user when we are root).

    Its data directory is made with ``mkdtemp`` in the system temp directory rather than
    under ``directory``: the unprivileged user must be able to reach it, and a test's own
    temp tree is often private to root. ``stop()`` removes it.
    """

    def __init__(self, directory: Path, settings: dict[str, str] | None = None, *,
                 host: str = "127.0.0.1", trust: str = "") -> None:
        self.directory = directory
        self.settings = settings or {}  # server settings, e.g. {"max_connections": "150"}
        self.data = Path(tempfile.mkdtemp(prefix="repoindex-pg-"))
        self.port = free_port()
        self.host = host  # listens on loopback and, when it is another address, on this too
        self.trust = trust  # a network (CIDR) whose clients log in without a password too
        self.url = f"postgresql://repoindex@{host}:{self.port}/postgres"
        self._runas: list[str] = []

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._runas, *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"{Path(argv[0]).name} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> PostgresServer:
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            user = "postgres" if _user_exists("postgres") else "nobody"
            self._runas = ["runuser", "-u", user, "--"]
            shutil.chown(self.data, user)
        self._run(initdb, "-D", str(self.data), "-U", "repoindex", "--auth=trust", "-E", "UTF8")
        if self.trust:
            with open(self.data / "pg_hba.conf", "a", encoding="utf-8") as hba:
                hba.write(f"host all all {self.trust} trust\n")
        self._run(pg_ctl, "-D", str(self.data), "-w", "-l", str(self.data / "server.log"),
                  "-o", self._options(), "start")
        return self

    def restart(self) -> None:
        """Fast shutdown (sessions terminated) and start again on the same port and data."""
        self._run(find_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "restart",
                  "-o", self._options())

    def _options(self) -> str:
        extra = "".join(f" -c {k}={v}" for k, v in self.settings.items())
        listen = ",".join(dict.fromkeys(("127.0.0.1", self.host)))
        return f"-p {self.port} -k {self.data} -c listen_addresses={listen}{extra}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(ConfigError):
                self._run(find_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _wait_for(check: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise ConfigError(f"{what} did not start within {timeout:g}s")


@dataclass
class Endpoints:
    redis_url: str
    database_url: str
    admin_url: str  # a database of the same server, for creating and dropping ours
    started: list[str]  # what was started here ("redis", "postgres"), for the report
    redis_server: RedisServer | None = None


@contextmanager
def services(database: str, *, private_redis: bool = False, drop: bool = False,
             own_database: bool = False) -> Iterator[Endpoints]:
    """Redis and a PostgreSQL database named ``database``, found or started; see module doc.

    With ``own_database`` a configured ``DATABASE_URL`` only names the server: the tests
    and benchmarks create (and with ``drop`` remove) a database of their own on it, so they
    never write into, or truncate, the database a user configured.
    """
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="repoindex-svc-")))
        started: list[str] = []
        redis_server = None
        # private: a server of our own whatever REDIS_URL says (the tests never touch a
        # Redis they did not start)
        redis_url = "" if private_redis else os.environ.get("REDIS_URL", "")
        if not redis_url and not private_redis and redis_answers(LOCAL_REDIS):
            redis_url = LOCAL_REDIS
        if not redis_url:
            (tmp / "redis").mkdir()
            redis_server = RedisServer(tmp / "redis").start()
            stack.callback(redis_server.stop)
            redis_url = redis_server.url
            started.append("redis")
        database_url = os.environ.get("DATABASE_URL", "")
        admin_url = database_url
        if database_url and own_database:
            database_url = create_database(admin_url, database)
            if drop:
                stack.callback(drop_database, admin_url, database)
        elif not database_url:
            admin_url = LOCAL_POSTGRES
            if not postgres_answers(admin_url):
                pg = PostgresServer(tmp)
                stack.callback(pg.stop)
                admin_url = pg.start().url
                started.append("postgres")
            database_url = create_database(admin_url, database)
            if drop:
                stack.callback(drop_database, admin_url, database)
        yield Endpoints(redis_url, database_url, admin_url, started, redis_server)
