"""Deployment files and services: compose parses, migrations are idempotent and safe in
parallel, throwaway servers start from the binaries on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import devservices
from workers.db import MIGRATIONS, migrate
from workers.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_runs_as_a_non_root_user() -> None:
    lines = (ROOT / "ops" / "Dockerfile").read_text().splitlines()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users


def test_compose_file_parses(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (ops/test.sh installs it)")
    env = {**os.environ, "FLOWER_PASSWORD": "x"}
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                          "-q"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    env.pop("FLOWER_PASSWORD")
    refused = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"),
                              "config", "-q"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode != 0 and "FLOWER_PASSWORD" in refused.stderr


def test_migrations_idempotent_and_concurrent(tmp_path: Path) -> None:
    """Five migrators at once on a fresh database: each migration applied exactly once."""
    admin = devservices.with_database(os.environ["DATABASE_URL"], "postgres")
    name = f"repoindex_mig_{os.getpid()}"
    url = devservices.create_database(admin, name)
    try:
        applied: list[list[str]] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    applied.append(migrate(conn))
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        versions = sorted(p.stem for p in MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql"))
        assert sorted(len(a) for a in applied) == [0, 0, 0, 0, len(versions)]
        with psycopg.connect(url) as conn:
            assert migrate(conn) == []
    finally:
        devservices.drop_database(admin, name)


def test_lines_migration_moves_an_existing_index_over(tmp_path: Path) -> None:
    """An index made before search read lines (migrations up to 007) gets its line rows
    from its stored blobs, numbered as git numbers them, and loses the blob trigram index."""
    admin = devservices.with_database(os.environ["DATABASE_URL"], "postgres")
    name = f"repoindex_lines_{os.getpid()}"
    url = devservices.create_database(admin, name)
    older = tmp_path / "migrations"
    older.mkdir()
    for path in MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql"):
        if path.stem < "008":
            (older / path.name).write_text(path.read_text())
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn, older)
            conn.execute("INSERT INTO blobs (sha, size, is_binary, lines, content) VALUES"
                         " ('a', 9, false, 3, E'one\\r\\n\\nthree\\n'),"
                         " ('b', 4, false, 1, 'tail'), ('e', 0, false, 0, ''),"
                         " ('bin', 3, true, 0, NULL)")
            assert migrate(conn) == ["008_lines"]
            assert conn.execute("SELECT sha, n, line FROM lines ORDER BY sha, n").fetchall() \
                == [("a", 1, "one\r"), ("a", 2, ""), ("a", 3, "three"), ("b", 1, "tail")]
            assert conn.execute("SELECT to_regclass('blobs_content_trgm') IS NULL,"
                                " to_regclass('lines_trgm') IS NOT NULL").fetchone() \
                == (True, True)
    finally:
        devservices.drop_database(admin, name)


def test_throwaway_postgres_and_redis(tmp_path: Path) -> None:
    """The fallback a fresh machine gets: servers from the binaries on PATH, then removed."""
    redis_server = devservices.RedisServer(tmp_path).start()
    try:
        assert devservices.redis_answers(redis_server.url)
        redis_server.restart()
        assert devservices.redis_answers(redis_server.url)
    finally:
        redis_server.stop()
    assert not devservices.redis_answers(redis_server.url)
    pg = devservices.PostgresServer(tmp_path)
    try:
        pg.start()
        url = devservices.create_database(pg.url, "throwaway")
        with psycopg.connect(url) as conn:
            assert migrate(conn) == sorted(p.stem for p in MIGRATIONS.glob("[0-9]*.sql"))
    finally:
        pg.stop()
    assert not devservices.postgres_answers(pg.url)


def test_services_prefers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://configured:1/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://configured/db")
    with devservices.services("unused") as ep:
        assert (ep.redis_url, ep.database_url, ep.started) == \
            ("redis://configured:1/0", "postgresql://configured/db", [])


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="apt-get install redis-server"):
        devservices.find_binary("redis-server")


def test_stats_of_unopened_database() -> None:
    from workers.db import Database
    from workers.settings import Settings

    db: Any = Database(Settings.from_env())
    assert db.stats()["checked_out"] == 0
    db.close()
    with pytest.raises(Exception, match="closed"):
        db.open()


def _path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH holding links to every program of ours except ``missing`` (and no apt-get)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "ls", "id", "git", "redis-server", "initdb", "promtool", "prometheus",
                 "docker-compose", "ip", "tc", "chromium"):
        found = shutil.which(name) or "/bin/true"
        if name not in missing:
            (bin_dir / name).symlink_to(found)
    return str(bin_dir)


@pytest.mark.parametrize(("missing", "packages"), [
    (("promtool",), "prometheus"),
    (("redis-server", "chromium"), "redis-server chromium"),
    (("tc",), "iproute2"),
])
def test_system_step_names_what_to_install_where_it_cannot_install(
        tmp_path: Path, missing: tuple[str, ...], packages: str) -> None:
    """Without apt-get (or not root) the README's commands name the packages and exit 2."""
    path = _path_without(tmp_path, *missing)
    done = subprocess.run([shutil.which("bash") or "bash", str(ROOT / "ops" / "system.sh")],
                          env={"PATH": path}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"install these packages first: {packages}\n" in done.stderr
    assert f"apt-get install {packages}" in done.stderr


def test_system_step_is_silent_when_everything_is_there(tmp_path: Path) -> None:
    done = subprocess.run([shutil.which("bash") or "bash", str(ROOT / "ops" / "system.sh"),
                           "--check"], env={"PATH": _path_without(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def test_the_demo_needs_fewer_programs_than_the_suite(tmp_path: Path) -> None:
    path = _path_without(tmp_path, "promtool", "chromium")
    done = subprocess.run([shutil.which("bash") or "bash", str(ROOT / "ops" / "system.sh"),
                           "--for", "demo"], env={"PATH": path}, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def _fake_root_with_apt(tmp_path: Path, missing: tuple[str, ...], brings: str) -> tuple[str, Path]:
    """PATH without ``missing``, an ``id`` that says root and an ``apt-get`` that records its
    arguments and, on install, puts ``brings`` (program names) on PATH: the install step's
    logic without touching the machine's packages."""
    path = _path_without(tmp_path, *missing, "id")
    bin_dir, calls = Path(path), tmp_path / "apt-calls"
    bash = shutil.which("bash") or "/bin/bash"
    (bin_dir / "id").write_text(f"#!{bash}\necho 0\n")
    links = " ".join(f"{shutil.which('true')}:{bin_dir / name}" for name in brings.split())
    (bin_dir / "apt-get").write_text(
        f"#!{bash}\necho \"$*\" >> {calls}\n"
        f"if [ \"$1\" = install ]; then for l in {links}; do {shutil.which('ln')} -s "
        "\"${l%%:*}\" \"${l#*:}\"; done; fi\n")
    for name in ("id", "apt-get"):
        (bin_dir / name).chmod(0o755)
    return path, calls


def test_system_step_installs_what_is_missing_as_root_with_apt_get(tmp_path: Path) -> None:
    """Root with apt-get: the README's command installs the missing packages itself (one
    update, one install of exactly those), then finds the programs and goes on."""
    path, calls = _fake_root_with_apt(tmp_path, ("promtool", "prometheus", "chromium"),
                                      brings="promtool prometheus chromium")
    done = subprocess.run([shutil.which("bash") or "bash", str(ROOT / "ops" / "system.sh")],
                          env={"PATH": path}, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == \
        (0, "installing from Debian's packages: prometheus chromium\n")
    assert calls.read_text().splitlines() == \
        ["update -qq", "install -y -qq --no-install-recommends prometheus chromium"]


def test_system_step_says_what_apt_get_did_not_bring(tmp_path: Path) -> None:
    path, calls = _fake_root_with_apt(tmp_path, ("redis-server", "tc"), brings="redis-server")
    done = subprocess.run([shutil.which("bash") or "bash", str(ROOT / "ops" / "system.sh")],
                          env={"PATH": path}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "still missing after apt-get install:\n" \
           "missing programs; install these packages first: iproute2\n" in done.stderr
    assert calls.read_text().splitlines()[1] == \
        "install -y -qq --no-install-recommends redis-server iproute2"


def test_the_test_command_starts_with_the_system_step() -> None:
    """`.ci/run` is README's command and nothing else; that command installs first."""
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == ["exec bash ./ops/test.sh"]
    steps = [ln for ln in (ROOT / "ops" / "test.sh").read_text().splitlines()
             if ln and not ln.startswith(("#", "set ", "cd "))]
    assert steps[0].startswith("bash ops/system.sh --for test")
