"""The suite never reads, writes or flushes a Redis or PostgreSQL database it did not create,
whatever REDIS_URL and DATABASE_URL say (issue 16, item 2).

A "user's" Redis and database are made here with a marker in each; a part of the suite that
enqueues, indexes and searches then runs with the environment pointing at them. Afterwards
each holds its marker and nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis

from devtools import devservices
from tests.conftest import SESSION


def test_the_users_services_are_left_alone(tmp_path: Path) -> None:
    admin = SESSION["endpoints"].admin_url
    name = f"users_own_{uuid.uuid4().hex[:8]}"
    user_db = devservices.create_database(admin, name)
    (tmp_path / "redis").mkdir()
    server = devservices.RedisServer(tmp_path / "redis").start()
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("users-marker", "keep me")
        with psycopg.connect(user_db, autocommit=True) as conn:
            conn.execute("CREATE TABLE users_marker (x int)")
        # every variable that names a service, pointed at the user's
        env = {**os.environ, "REDIS_URL": server.url, "DATABASE_URL": user_db,
               "REPOINDEX_RESULT_BACKEND": server.url.rsplit("/", 1)[0] + "/2"}
        env.pop("COVERAGE_PROCESS_START", None)
        # the CLI tests (through the console script, workers, the demo, a fresh database)
        # and the service tests (throwaway servers, migrations)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/e2e/test_cli.py", "-k", "not benchmarks", "tests/test_ops.py"],
            cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True,
            timeout=900, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert re.search(r"\b(\d+) passed", done.stdout) and " failed" not in done.stdout
        with redis.Redis.from_url(server.url) as client:
            keys: list[Any] = [k.decode() for k in client.keys("*")]
            others = [client.keys("*") for client in
                      (redis.Redis.from_url(server.url.rsplit("/", 1)[0] + f"/{n}")
                       for n in range(1, 16))]
        assert keys == ["users-marker"] and not any(others)
        with psycopg.connect(user_db, autocommit=True) as conn:
            tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname"
                                  " NOT IN ('pg_catalog', 'information_schema')").fetchall()
        assert tables == [("users_marker",)]
    finally:
        server.stop()
        devservices.drop_database(admin, name)
