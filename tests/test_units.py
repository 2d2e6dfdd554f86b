"""Small pure pieces: classification, settings, scrubbing, logging, search input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasks.classify import classify, decode_path, language
from tasks.search import like_pattern, search
from workers import logs
from workers.errors import BadInput, ConfigError
from workers.ledger import error_text
from workers.scrub import scrub, scrub_value
from workers.settings import VARIABLES, Settings


def test_classify() -> None:
    assert classify(b"a\x00b").binary
    assert classify(b"x" * 9000 + b"\x00").binary  # NUL past git's 8000 bytes: still binary
    text = classify(b"one\ntwo")
    assert (text.binary, text.lines, text.lossy, text.text) == (False, 2, False, "one\ntwo")
    assert classify(b"").lines == 0
    assert classify(b"a\n").lines == 1
    lossy = classify(b"caf\xe9\n")
    assert lossy.lossy and lossy.text == "caf\ufffd\n"


def test_language_and_paths() -> None:
    assert language("a.py") == "python"
    assert language("Makefile") == "makefile"
    assert language("notes.txt") == "text"
    assert language("blob.weird") is None
    assert decode_path(b"caf\xc3\xa9") == "café"
    assert decode_path(b"bad\xff") == "bad\\xff"


def test_settings_from_env(tmp_path: Path) -> None:
    s = Settings.from_env({"REPOINDEX_ROOTS": f"{tmp_path}:{tmp_path}/b",
                           "REPOINDEX_MAX_FILE_BYTES": "10", "REPOINDEX_LOG_FORMAT": "JSON",
                           "REDIS_URL": "redis://h:1/2"})
    assert s.roots == (tmp_path, tmp_path / "b")
    assert s.max_file_bytes == 10 and s.log_format == "json"
    assert s.result_backend == "redis://h:1/2"
    assert Settings.from_env({}).roots == ()


@pytest.mark.parametrize(("env", "message"), [
    ({"REPOINDEX_MAX_FILE_BYTES": "lots"}, "must be an integer"),
    ({"REPOINDEX_DB_POOL_MAX": "0"}, "must be >= 1"),
    ({"REPOINDEX_DB_POOL_MIN": "3", "REPOINDEX_DB_POOL_MAX": "2"}, "must not exceed"),
    ({"REPOINDEX_LOG_FORMAT": "xml"}, "text or json"),
])
def test_settings_refuse_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_readme_configuration_table_is_the_declared_settings() -> None:
    """Row by row: variable, default and meaning as ``Settings`` declares them."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("| Variable | Default | Meaning |\n|---|---|---|\n", 1)[1]
    rows = [line for line in table.split("\n\n", 1)[0].splitlines()]
    assert rows == [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in VARIABLES]


def test_settings_defaults_are_the_declared_ones() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().result_backend == Settings().redis_url
    assert Settings.from_env({"REPOINDEX_SAMPLE_SECONDS": "0.5"}).sample_seconds == 0.5


def test_scrub() -> None:
    assert scrub("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert scrub("postgresql://u:p%40ss@db/x failed") == "postgresql://u:***@db/x failed"
    assert scrub("host=db password=secret user=x") == "host=db password=*** user=x"
    assert scrub("https://github.com/org/repo") == "https://github.com/org/repo"


@pytest.mark.parametrize(("text", "scrubbed"), [
    ("https://TOKEN123@host/x.git", "https://***@host/x.git"),  # a token as the user name
    ("https://ghp_0123456789abcdefghij:x-oauth-basic@h/x", "https://***@h/x"),
    ("https://user:p@ss@host/x", "https://user:***@host/x"),  # a raw '@' in the password
    ("https://user:secret@h/x, mail a@b.c", "https://user:***@h/x, mail a@b.c"),
    ("ssh://git@host/x.git", "ssh://git@host/x.git"),  # an account, not a secret
    ("git@github.com:org/x.git", "git@github.com:org/x.git"),
    ("ssh://u:pw@host/x", "ssh://u:***@host/x"),
])
def test_scrub_user_tokens_and_raw_at_signs(text: str, scrubbed: str) -> None:
    assert scrub(text) == scrubbed


def test_scrub_value_reaches_every_string() -> None:
    value = {"source": "https://TOKEN123@h/x", "nested": [("https://u:pw@h/y", 3)], "n": 1}
    assert scrub_value(value) == {"source": "https://***@h/x",
                                  "nested": [("https://u:***@h/y", 3)], "n": 1}


def test_log_lines_cannot_be_forged(capsys: pytest.CaptureFixture[str]) -> None:
    """Control characters in a message or a bound value are escaped; a traceback's lines
    are indented: every line of the log that starts at column 0 is a record."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    forged = "2026-12-01 00:00:00,000 ERROR [MainProcess] FORGED"
    try:
        logs.configure("INFO", "text")
        log = logging.getLogger("repoindex.test")
        with logs.bound(job=f"j\n{forged}"):
            log.info("task %s received", f"id\r\n{forged}\u2028\x1b[31m")
            try:
                raise ValueError(f"bad\n{forged}")
            except ValueError:
                log.exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = capsys.readouterr().err.splitlines()
    assert not any(line.startswith(forged) for line in lines), lines
    assert "id\\r\\n" + forged + "\\u2028\\x1b[31m" in lines[0]
    assert lines[0].endswith(f"job=j\\n{forged}")
    assert [ln[:4] for ln in lines[2:]] == ["    "] * len(lines[2:])


def test_error_text() -> None:
    assert error_text(None) is None
    assert error_text(BadInput("clear")) == "clear"
    assert error_text(ValueError("a\nb")) == "ValueError: a"
    assert error_text(RuntimeError()) == "RuntimeError"
    assert "returned to the queue" in (error_text(SystemExit()) or "")


def test_json_logs_carry_context(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("INFO", "json")
        with logs.bound(job="j1"):
            logs.bind(repo="r1")
            logging.getLogger("repoindex.test").info("hello %s", "there")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        doc = json.loads(line)
        assert (doc["message"], doc["job"], doc["repo"], doc["level"]) == \
            ("hello there", "j1", "r1", "INFO")
        logs.configure("INFO", "text")
        logging.getLogger("repoindex.test").warning("plain")
        assert "WARNING" in capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_like_pattern_escapes_wildcards() -> None:
    assert like_pattern("50%_a\\b") == "%50\\%\\_a\\\\b%"


def test_search_input_errors(db: psycopg.Connection[Any]) -> None:
    from workers.db import migrate

    migrate(db)
    with pytest.raises(BadInput, match="must not be empty"):
        search(db, "")
    with pytest.raises(BadInput, match="limit"):
        search(db, "x", limit=0)
    with pytest.raises(BadInput, match="invalid regular expression"):
        search(db, "(unclosed", regex=True)
    assert search(db, "'; DROP TABLE blobs; --", repo="no-such-repo") == []
    assert search(db, "%", repo="no-such-repo") == []  # a literal percent sign
    assert db.execute("SELECT count(*) >= 0 FROM blobs").fetchone() == (True,)


def test_expensive_search_is_cut_by_the_statement_timeout(db: psycopg.Connection[Any]) -> None:
    """A regular expression over 4 MB of text with a 1 ms budget: a clear error, and the
    connection is usable afterwards (the rows live in a transaction that is rolled back)."""
    from workers.db import migrate

    migrate(db)
    with db.transaction():
        repo = db.execute("INSERT INTO repositories (name, source, ref) VALUES"
                          " ('slow-search', '/x', 'HEAD') RETURNING id").fetchone()
        assert repo is not None
        big = "ab" * (2 << 20)
        db.execute("INSERT INTO blobs (sha, size, is_binary, lines, content) VALUES ('slow',"
                   " %s, false, 1, %s)", (len(big), big))
        db.execute("INSERT INTO lines (sha, n, line) VALUES ('slow', 1, %s)", (big,))
        db.execute("INSERT INTO files (repo_id, path, sha, mode, kind) VALUES"
                   " (%s, 'big.txt', 'slow', 33188, 'text')", (repo[0],))
        with pytest.raises(BadInput, match="search took longer than 1 ms"):
            search(db, "(a|b)*c$", regex=True, repo="slow-search", timeout_ms=1)
        raise psycopg.Rollback()
    assert db.execute("SELECT count(*) FROM repositories WHERE name = 'slow-search'"
                      ).fetchone() == (0,)


def test_leak_reaches_sentry_fingerprinted_by_kind() -> None:
    """With a DSN, a leak becomes one warning event fingerprinted by kind (no network)."""
    import sentry_sdk
    from sentry_sdk.transport import Transport

    from workers import alerts
    from workers.sentinel import Leak

    events: list[dict[str, Any]] = []

    class Capture(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            events.extend(item.payload.json for item in envelope.items if item.payload.json)

    alerts.report_leak(Leak("fd", "fd=3 target=/x"), "op0")  # inactive: nothing, no error
    assert alerts.init("") is False
    assert alerts.init("http://key@127.0.0.1:9/1", transport=Capture) is True
    try:
        alerts.report_leak(Leak("fd", "fd=3 target=/x"), "op1")
        sentry_sdk.capture_message("failed redis://:secret@h:1/0")
        try:
            raise ValueError("cannot reach postgresql://u:pw@db/x")
        except ValueError:
            sentry_sdk.capture_exception()
        sentry_sdk.flush()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()  # back to a disabled client
    leak = next(e for e in events if e.get("level") == "warning")
    assert leak["fingerprint"] == ["repoindex-leak", "fd"]
    assert leak["tags"]["op"] == "op1"
    assert any(e.get("message") == "failed redis://:***@h:1/0" for e in events)
    values = [v["value"] for e in events for v in (e.get("exception") or {}).get("values", [])]
    assert values == ["cannot reach postgresql://u:***@db/x"]


def test_idle_in_transaction_backstop_ends_a_forgotten_transaction() -> None:
    """Our sessions (pool and CLI: ``db.connect``) carry idle_in_transaction_session_timeout:
    a transaction left open is ended by the server."""
    import dataclasses
    import time

    from workers import db as dbmod
    from workers.settings import Settings

    settings = dataclasses.replace(Settings.from_env(), idle_tx_timeout_ms=300)
    with dbmod.connect(settings) as conn:
        conn.execute("SELECT 1")  # opens a transaction (not autocommit) and leaves it idle
        time.sleep(1.0)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            conn.execute("SELECT 1")


def test_transient_is_decided_by_sqlstate_and_connection_state() -> None:
    """Retried: connection exceptions, server shutdown/restart, too many connections,
    serialization failures, a broken connection, a pool timeout. Not retried: class 54
    (e.g. "index row size exceeds"), which psycopg also maps to OperationalError."""
    import psycopg

    from workers.db import transient
    from workers.errors import BadInput, PoolTimeout

    errors = psycopg.errors
    for error in (errors.AdminShutdown(), errors.CannotConnectNow(), errors.CrashShutdown(),
                  errors.TooManyConnections(), errors.SerializationFailure(),
                  errors.DeadlockDetected(), errors.ConnectionFailure(),
                  psycopg.OperationalError("server closed the connection unexpectedly"),
                  PoolTimeout("no database connection within 2 s")):
        assert transient(error), error
    for error in (errors.ProgramLimitExceeded(), errors.StatementTooComplex(),
                  errors.UniqueViolation(), errors.QueryCanceled(), ValueError("x"),
                  BadInput("bad")):
        assert not transient(error), error
    assert isinstance(errors.ProgramLimitExceeded(), psycopg.OperationalError)
