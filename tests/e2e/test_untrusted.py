"""Issue 14 through a real worker and the index: a hostile repository runs nothing, reads
nothing outside the roots, cannot change what another repository's files show, cannot
make a child read a huge symlink; credentials and caller strings stay out of every place
a caller or an administrator looks. Each test ends with the worker's children at their
baseline."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools.launcher import WorkerProcess
from tasks.search import search
from tests import gitrepo, hostile
from tests.conftest import start_worker
from tests.e2e.support import (
    assert_same,
    files_of,
    fleet_state,
    inside_states,
    leak_lines,
    ledger_states,
    send,
    warm_up,
)

TOKEN = "ghp_TOPSECRETTOKEN1234567890"


@pytest.fixture(scope="module")
def guarded(celery_app: Any, probe_table: None) -> Iterator[WorkerProcess]:
    proc = start_worker("untrusted", concurrency=1, queue=f"untrusted-{uuid.uuid4().hex[:6]}")
    try:
        warm_up(celery_app, proc)
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.fixture
def baseline(guarded: WorkerProcess, celery_app: Any,
             temp_root: Path) -> Iterator[dict[int, dict[str, Any]]]:
    before = fleet_state(guarded, temp_root)
    yield before
    for state in inside_states(celery_app, guarded).values():
        assert state["leaks"] == {} and state["pool"]["checked_out"] == 0
    assert_same(fleet_state(guarded, temp_root), before)
    assert leak_lines(guarded) == [], "\n".join(leak_lines(guarded))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


def index(app: Any, worker: WorkerProcess, source: str, name: str, **kw: Any) -> Any:
    job = send(app, worker, "repoindex.index_repository", source=source, name=name, **kw)
    job.get(timeout=300, propagate=False)
    return job


def test_partial_clone_runs_nothing_and_fails_clearly(
        guarded: WorkerProcess, celery_app: Any, roots: Path, outside: Path,
        db: psycopg.Connection[Any], baseline: dict[int, dict[str, Any]]) -> None:
    canary = outside / "CANARY"
    origin = hostile.good(outside / "origin")
    evil = hostile.partial_clone(roots / f"evil-{uuid.uuid4().hex[:6]}", remote_url=str(origin),
                                 extra_config={"remote.origin.uploadpack":
                                               f"touch {canary}; git-upload-pack",
                                               "core.gitProxy":
                                               str(hostile.canary_script(outside, canary))})
    job = index(celery_app, guarded, str(evil), "evil-partial")
    assert job.state == "FAILURE"
    assert "is missing: the repository is a partial clone and repoindex never fetches" \
        in str(job.result)
    assert ledger_states(db, job.id) == ["failed"]
    assert files_of(db, "evil-partial") == {}
    assert not canary.exists()


def test_outside_the_roots_is_refused_and_never_searchable(
        guarded: WorkerProcess, celery_app: Any, roots: Path, outside: Path,
        db: psycopg.Connection[Any], baseline: dict[int, dict[str, Any]]) -> None:
    base = roots / f"shapes-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    for n, (shape, source) in enumerate(hostile.outside_shapes(base, outside).items()):
        job = index(celery_app, guarded, str(source), f"outside-{n}")
        assert job.state == "FAILURE", shape
        assert "outside the allowed roots (REPOINDEX_ROOTS)" in str(job.result), (shape,
                                                                                  job.result)
        assert ledger_states(db, job.id) == ["failed"]
    assert search(db, hostile.SECRET) == []
    assert db.execute("SELECT count(*) FROM blobs WHERE content LIKE %s",
                      (f"%{hostile.SECRET}%",)).fetchone() == (0,)


@pytest.mark.parametrize("shape", ["replace-ref", "forged-loose-object"])
def test_one_repository_cannot_change_what_another_shows(
        guarded: WorkerProcess, celery_app: Any, roots: Path, db: psycopg.Connection[Any],
        baseline: dict[int, dict[str, Any]], shape: str) -> None:
    """The attacker maps the victim's blob id to other content and is indexed first."""
    tag = uuid.uuid4().hex[:6]
    victim_text = f"def allowed(user):\n    return check(user)  # {tag}\n"
    victim = hostile.good(roots / f"victim-{tag}", {"auth.py": victim_text})
    victim_blob = gitrepo.git(victim, "rev-parse", "HEAD:auth.py").strip()
    attacker = hostile.good(roots / f"attacker-{tag}", {"readme.txt": "hi\n"})
    evil = hostile.hash_object(attacker, f"def allowed(user):\n    return True  # POISONED {tag}\n")
    if shape == "replace-ref":
        gitrepo.write(attacker / "auth.py", victim_text)
        gitrepo.commit(attacker)
        gitrepo.git(attacker, "update-ref", f"refs/replace/{victim_blob}", evil)
    else:
        target = hostile.loose_path(attacker / ".git", victim_blob)
        target.parent.mkdir(exist_ok=True)
        os.rename(hostile.loose_path(attacker / ".git", evil), target)
        gitrepo.git(attacker, "update-index", "--add", "--cacheinfo",
                    f"100644,{victim_blob},auth.py")
        gitrepo.git(attacker, "commit", "-q", "-m", "forge")
    first = index(celery_app, guarded, str(attacker), f"attacker-{tag}")
    if shape == "replace-ref":
        assert first.state == "SUCCESS", first.result
    else:
        assert first.state == "FAILURE"
        assert f"git object {victim_blob} is corrupt" in str(first.result)
    second = index(celery_app, guarded, str(victim), f"victim-{tag}")
    assert second.state == "SUCCESS", second.result
    stored = db.execute("SELECT content FROM blobs WHERE sha = %s", (victim_blob,)).fetchone()
    assert stored == (victim_text,)
    assert [m.text for m in search(db, f"POISONED {tag}")] == []
    assert [m.text.strip() for m in search(db, tag, repo=f"victim-{tag}")] == \
        [f"return check(user)  # {tag}"]


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_huge_symlink_is_recorded_never_read(guarded: WorkerProcess, celery_app: Any,
                                             roots: Path, db: psycopg.Connection[Any],
                                             baseline: dict[int, dict[str, Any]]) -> None:
    """A 200 MB blob committed with mode 120000 (no file system accepts such a target)."""
    repo = hostile.good(roots / f"biglink-{uuid.uuid4().hex[:6]}", {"a.txt": "a\n"})
    chunk = "L" * (1 << 20)
    big = hostile.hash_object(repo, chunk * 200)
    gitrepo.git(repo, "update-index", "--add", "--cacheinfo", f"120000,{big},biglink")
    gitrepo.git(repo, "commit", "-q", "-m", "huge link")
    (child,) = guarded.children()
    peak_before = _peak_rss(child)
    job = index(celery_app, guarded, str(repo), "biglink")
    assert job.state == "SUCCESS", job.result
    assert job.result["skipped"]["too_large"] == 1 and job.result["read"] == 1
    row = db.execute("SELECT f.kind, f.mode, f.size, f.target FROM files f JOIN repositories r"
                     " ON r.id = f.repo_id WHERE r.name = 'biglink' AND f.path = 'biglink'"
                     ).fetchone()
    assert row == ("too_large", 0o120000, 200 << 20, None)
    assert _peak_rss(child) - peak_before < 32 << 20  # the 200 MB were never in the child


def _backend_docs(job_id: str) -> str:
    with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
        raw = client.get(f"celery-task-meta-{job_id}")
    assert raw is not None
    return raw.decode()


def _capture_received(app: Any, seen: list[dict[str, Any]], ready: threading.Event,
                      stop: threading.Event) -> None:
    """Every task-received event until ``stop``; ``ready`` once events arrive (heartbeats)."""
    def on_event(event: dict[str, Any]) -> None:
        ready.set()
        if event.get("type") == "task-received":
            seen.append(event)

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                for _ in receiver.itercapture(limit=None, timeout=0.5, wakeup=False):
                    if stop.is_set():
                        return


@pytest.mark.parametrize("source", [
    f"https://{TOKEN}@127.0.0.1:1/org/repo.git",
    f"https://{TOKEN}:x-oauth-basic@127.0.0.1:1/org/repo.git",
    f"https://deploy:p@ss-{TOKEN}@127.0.0.1:1/org/repo.git",
])
def test_source_credentials_appear_nowhere(guarded: WorkerProcess, celery_app: Any,
                                           db: psycopg.Connection[Any], source: str,
                                           baseline: dict[int, dict[str, Any]]) -> None:
    """A token as the URL's user name, with a placeholder password, or a password holding a
    raw '@': not in the job error, the ledger, the stored result, the task-received event
    (what Flower shows and keeps), or the worker's log."""
    seen: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()
    listener = threading.Thread(target=_capture_received, args=(celery_app, seen, ready, stop))
    listener.start()
    try:
        assert ready.wait(30), "no events from the worker"
        job = index(celery_app, guarded, source, "tokened")
    finally:
        stop.set()
        listener.join(10)
    assert job.state == "FAILURE"
    places = {"result": str(job.result), "backend": _backend_docs(job.id),
              "ledger": json.dumps(db.execute("SELECT error FROM runs WHERE job_id = %s",
                                              (job.id,)).fetchall()),
              "events": json.dumps([e for e in seen if e.get("uuid") == job.id]),
              "log": guarded.log()}
    assert places["events"] != "[]", "the task-received event was not captured"
    assert "127.0.0.1:1/org/repo.git" in places["result"]
    for place, text in places.items():
        assert TOKEN not in text, place


def test_caller_strings_cannot_forge_log_lines(guarded: WorkerProcess, celery_app: Any,
                                               baseline: dict[int, dict[str, Any]]) -> None:
    forged = "2026-12-01 00:00:00,000 ERROR [MainProcess] FORGED"
    job_id = f"zz-{uuid.uuid4().hex[:6]}\n{forged}"
    job = celery_app.send_task("repoindex.canary", kwargs={"seconds": 0}, task_id=job_id,
                               queue=guarded.queue)
    job.get(timeout=60)
    log = guarded.log()
    assert "\\n" + forged in log  # logged, escaped
    assert not any(line.startswith(forged) for line in log.splitlines())


def test_path_longer_than_the_index_holds_fails_once(
        guarded: WorkerProcess, celery_app: Any, roots: Path, db: psycopg.Connection[Any],
        baseline: dict[int, dict[str, Any]]) -> None:
    """A 4,000-character path: one line, not retried, nothing written."""
    repo = hostile.good(roots / f"longpath-{uuid.uuid4().hex[:6]}", {"a.txt": "a\n"})
    blob = hostile.hash_object(repo, "deep\n")
    long_path = "/".join(["d" * 200] * 19) + "/" + "x" * 150
    gitrepo.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{long_path}")
    gitrepo.git(repo, "commit", "-q", "-m", "long path")
    job = index(celery_app, guarded, str(repo), "longpath")
    assert job.state == "FAILURE"
    assert "bytes long; the index holds paths of up to 2048 bytes" in str(job.result)
    assert "\n" not in str(job.result)
    assert ledger_states(db, job.id) == ["failed"]
    assert files_of(db, "longpath") == {}
