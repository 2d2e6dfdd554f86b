"""Hostile input and resource faults against real workers (issue 8): each ends with a clear
error where the caller looks, the worker alive, nothing leaked, nothing half-written."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from kombu import Connection, Exchange, Producer

from devtools.devservices import free_port
from devtools.launcher import WorkerProcess
from tasks.search import search
from tests import gitrepo
from tests.conftest import start_worker
from tests.e2e.support import (
    assert_same,
    files_of,
    fleet_state,
    inside_states,
    leak_lines,
    ledger_states,
    send,
    server_sessions,
    temp_areas,
    wait_until,
    warm_up,
)


@pytest.fixture(scope="module")
def strict(celery_app: Any, probe_table: None) -> Iterator[WorkerProcess]:
    """A worker of its own (limits below are the ones these tests hit)."""
    proc = start_worker("strict", concurrency=2, queue=f"strict-{uuid.uuid4().hex[:6]}",
                        env={"REPOINDEX_MAX_FILES": "12000", "REPOINDEX_DB_POOL_TIMEOUT": "3"})
    try:
        warm_up(celery_app, proc)
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.fixture
def baseline(strict: WorkerProcess, celery_app: Any,
             temp_root: Path) -> Iterator[dict[int, dict[str, Any]]]:
    """The strict worker's children before the test; they must be back there after it."""
    before = fleet_state(strict, temp_root)
    yield before
    inside = inside_states(celery_app, strict)
    for state in inside.values():
        assert state["leaks"] == {} and state["pool"]["checked_out"] == 0
    assert_same(fleet_state(strict, temp_root), before)
    assert strict.proc is not None and strict.proc.poll() is None
    assert leak_lines(strict) == [], "\n".join(leak_lines(strict))


def index(app: Any, worker: WorkerProcess, source: str, name: str, **kw: Any) -> Any:
    job = send(app, worker, "repoindex.index_repository", source=source, name=name, **kw)
    job.get(timeout=300, propagate=False)
    return job


def repo_files(db: psycopg.Connection[Any], name: str) -> dict[str, str]:
    return {path: kind for path, (kind, _) in files_of(db, name).items()}


def test_hostile_repository_contents(strict: WorkerProcess, celery_app: Any, roots: Path,
                                     db: psycopg.Connection[Any],
                                     baseline: dict[int, dict[str, Any]]) -> None:
    """Paths with newlines and invalid UTF-8, a 60 kB line, a NUL in text, symlinks out of
    the repository: every path recorded with its kind; nothing read through a link."""
    repo = gitrepo.init(roots / "hostile")
    with open(os.fsencode(repo) + b"/bad\xff\xfename.txt", "wb") as f:
        f.write(b"invalid utf-8 name\n")
    gitrepo.write(repo / "new\nline.txt", "a newline in the name\n")
    gitrepo.write(repo / "long.txt", "x" * 60_000 + " tail-of-the-long-line\n")
    gitrepo.write(repo / "nul.txt", "text before\n\0after the NUL\n")
    gitrepo.write(repo / "-rf.txt", "a name that looks like an option\n")
    os.symlink("/etc/passwd", repo / "passwd")
    os.symlink("../../..", repo / "up")
    os.symlink("self", repo / "self")
    gitrepo.commit(repo)
    job = index(celery_app, strict, str(repo), "hostile")
    assert job.state == "SUCCESS", job.result
    files = repo_files(db, "hostile")
    assert files == {"bad\\xff\\xfename.txt": "text", "new\nline.txt": "text",
                     "long.txt": "text", "nul.txt": "binary", "-rf.txt": "text",
                     "passwd": "symlink", "up": "symlink", "self": "symlink"}
    targets = {p: target for p, (kind, target) in files_of(db, "hostile").items()
               if kind == "symlink"}
    assert targets == {"passwd": "/etc/passwd", "up": "../../..", "self": "self"}
    passwd = Path("/etc/passwd").read_text().splitlines()[0]
    assert db.execute("SELECT count(*) FROM blobs WHERE content LIKE %s",
                      (f"%{passwd}%",)).fetchone() == (0,)
    found = search(db, "tail-of-the-long-line", repo="hostile")
    assert [m.path for m in found] == ["long.txt"]


def test_too_many_files_is_refused_before_anything_is_written(
        strict: WorkerProcess, celery_app: Any, roots: Path, db: psycopg.Connection[Any],
        baseline: dict[int, dict[str, Any]]) -> None:
    repo = roots / "too-many"
    gitrepo.generated(repo, files=12_100)
    job = index(celery_app, strict, str(repo), "too-many")
    assert job.state == "FAILURE"
    assert "has more than 12000 files (REPOINDEX_MAX_FILES)" in str(job.result), job.result
    assert ledger_states(db, job.id) == ["failed"]
    assert repo_files(db, "too-many") == {}


def test_pickle_message_is_refused_and_the_worker_goes_on(
        strict: WorkerProcess, celery_app: Any, roots: Path,
        baseline: dict[int, dict[str, Any]]) -> None:
    """A pickled task message is never deserialized (a pickle that would run code on load)."""
    marker = roots / f"pickle-ran-{uuid.uuid4().hex[:6]}"
    body = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    queue = strict.queue
    assert queue is not None
    with Connection(os.environ["REDIS_URL"]) as conn:
        Producer(conn).publish(
            body, routing_key=queue, exchange=Exchange(queue),
            content_type="application/x-python-serialize",
            content_encoding="binary", serializer=None,
            headers={"lang": "py", "task": "repoindex.canary", "id": str(uuid.uuid4()),
                     "argsrepr": "()", "kwargsrepr": "{}"})
    wait_until(lambda: "untrusted content" in strict.log(), 30, "the refusal logged")
    assert not marker.exists()
    job = send(celery_app, strict, "repoindex.canary", seconds=0)
    assert job.get(timeout=60)["seconds"] < 5


def _git_of(worker: WorkerProcess, what: str) -> psutil.Process | None:
    for pid in worker.children():
        for proc in psutil.Process(pid).children(recursive=True):
            try:
                if what in proc.cmdline():
                    return proc
            except psutil.NoSuchProcess:
                continue
    return None


def test_git_process_killed_mid_read(strict: WorkerProcess, celery_app: Any, roots: Path,
                                     db: psycopg.Connection[Any],
                                     baseline: dict[int, dict[str, Any]]) -> None:
    repo = roots / "git-killed"
    gitrepo.generated(repo, files=8000)
    job = send(celery_app, strict, "repoindex.index_repository", source=str(repo),
               name="git-killed")
    found: list[psutil.Process] = []
    wait_until(lambda: found.append(p) is None if (p := _git_of(strict, "cat-file")) else False,
               120, "git cat-file running")
    found[0].send_signal(signal.SIGKILL)
    job.get(timeout=120, propagate=False)
    assert job.state == "FAILURE"
    assert str(job.result) == "git cat-file failed (killed by signal 9)", job.result
    assert ledger_states(db, job.id) == ["failed"]
    assert repo_files(db, "git-killed") == {}
    assert server_sessions(db) == []
    again = index(celery_app, strict, str(repo), "git-killed")
    assert again.state == "SUCCESS" and again.result["files"] == len(gitrepo.tracked(repo))


def _set_limit(worker: WorkerProcess, which: int, value: int) -> None:
    for pid in worker.children():
        psutil.Process(pid).rlimit(which, (value, resource.getrlimit(which)[1]))


def test_nofile_limit_of_128(strict: WorkerProcess, celery_app: Any, roots: Path,
                             db: psycopg.Connection[Any],
                             baseline: dict[int, dict[str, Any]]) -> None:
    """With RLIMIT_NOFILE 128 a 10,000-file repository indexes (a bounded number of files is
    open at once); an operation that does hit EMFILE fails cleanly and the next one works."""
    repo = roots / "nofile"
    gitrepo.generated(repo, files=10_000)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    _set_limit(strict, resource.RLIMIT_NOFILE, 128)
    try:
        jobs = [send(celery_app, strict, "repoindex.index_repository", source=str(repo),
                     name="nofile") for _ in range(2)]
        for job in jobs:
            assert job.get(timeout=300)["files"] == len(gitrepo.tracked(repo))
        greedy = send(celery_app, strict, "probe.open_files", n=200)
        greedy.get(timeout=60, propagate=False)
        assert greedy.state == "FAILURE" and "Too many open files" in str(greedy.result)
        assert ledger_states(db, greedy.id) == ["failed"]
        modest = send(celery_app, strict, "probe.open_files", n=50)
        assert modest.get(timeout=60)["live"]["files"] == 50
    finally:
        _set_limit(strict, resource.RLIMIT_NOFILE, soft)


@pytest.fixture
def git_daemon(roots: Path) -> Iterator[str]:
    """``git daemon`` on a loopback port serving ``roots``: a real remote to clone from."""
    port = free_port()
    proc = subprocess.Popen(["git", "daemon", "--export-all", f"--base-path={roots}",
                             "--listen=127.0.0.1", f"--port={port}", "--reuseaddr", str(roots)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _port_open(port), 15, "git daemon listening")
        yield f"git://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_temp_area_full(strict: WorkerProcess, celery_app: Any, roots: Path, temp_root: Path,
                        db: psycopg.Connection[Any], git_daemon: str,
                        baseline: dict[int, dict[str, Any]]) -> None:
    """A clone that cannot be written (RLIMIT_FSIZE of 16 kB: git gets SIGXFSZ) fails
    clearly and leaves no temp area; once space returns the same job works."""
    repo = roots / "fsize"
    gitrepo.generated(repo, files=300)
    gitrepo.write(repo / "noise.bin", os.urandom(100_000))  # incompressible: the pack > 16 kB
    gitrepo.commit(repo)
    url = f"{git_daemon}/fsize"
    _set_limit(strict, resource.RLIMIT_FSIZE, 16 * 1024)
    try:
        job = index(celery_app, strict, url, "fsize")
        assert job.state == "FAILURE"
        assert str(job.result).startswith(f"git clone {url}"), job.result
        assert ledger_states(db, job.id) == ["failed"]
        assert temp_areas(temp_root) == []
    finally:
        _set_limit(strict, resource.RLIMIT_FSIZE, resource.RLIM_INFINITY)
    again = index(celery_app, strict, url, "fsize")
    assert again.state == "SUCCESS", again.result
    assert again.result["files"] == len(gitrepo.tracked(repo))


def test_enqueue_with_redis_unreachable_says_so(session_env: dict[str, str]) -> None:
    env = {**os.environ, "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    env.pop("REPOINDEX_RESULT_BACKEND", None)
    cli = [sys.executable, "-c", "from cli import main; main()"]
    done = subprocess.run([*cli, "enqueue", "/srv/repo"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("repoindex: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_repository_changing_while_indexed(strict: WorkerProcess, celery_app: Any,
                                           roots: Path, db: psycopg.Connection[Any],
                                           baseline: dict[int, dict[str, Any]]) -> None:
    """Files deleted and a new commit made while the operation reads: the ref was resolved
    to one commit at the start and git objects do not change, so the index is exactly that
    commit; the next run picks up the new one."""
    repo = roots / "moving"
    gitrepo.generated(repo, files=8000)
    first = gitrepo.git(repo, "rev-parse", "HEAD").strip()
    tracked_before = gitrepo.tracked(repo)
    job = send(celery_app, strict, "repoindex.index_repository", source=str(repo),
               name="moving")
    wait_until(lambda: job.state == "PROGRESS", 120, "operation reading blobs")
    gitrepo.git(repo, "rm", "-q", "-r", "pkg1", "pkg2")
    gitrepo.commit(repo, "removed two packages while being indexed")
    result = job.get(timeout=300)
    assert result["commit"] == first
    assert set(repo_files(db, "moving")) == tracked_before
    again = index(celery_app, strict, str(repo), "moving")
    assert again.state == "SUCCESS" and again.result["commit"] != first
    assert set(repo_files(db, "moving")) == gitrepo.tracked(repo) < tracked_before
