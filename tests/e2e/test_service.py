"""The indexing service end to end: a real `celery worker`, real Redis and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.launcher import WorkerProcess
from tests import gitrepo
from tests.conftest import run
from tests.e2e.support import files_of


@pytest.fixture(scope="module")
def big_repo(roots: Path) -> tuple[Path, dict[str, str]]:
    repo = roots / "big"
    return repo, gitrepo.generated(repo, files=2000)


def test_index_generated_repository(worker: WorkerProcess, celery_app: Any,
                                   db: psycopg.Connection[Any],
                                   big_repo: tuple[Path, dict[str, str]]) -> None:
    """Rows equal `git ls-files`; every skip reason is right; search finds the marker."""
    repo, special = big_repo
    res = run(celery_app, "repoindex.index_repository", source=str(repo), name="big")
    assert res.state == "SUCCESS", res.result
    summary = res.result
    expected = gitrepo.tracked(repo)
    rows = files_of(db, "big")
    assert set(rows) == expected
    assert "build/output.js" not in rows and "pkg0/obj.o" not in rows
    for path, kind in special.items():
        assert rows[path][0] == kind, path
    assert rows["links/passwd"][1] == "/etc/passwd"
    assert rows["links/parent"][1] == ".."
    others = {kind for path, (kind, _) in rows.items() if path not in special}
    assert others == {"text"}
    assert summary["files"] == len(expected)
    assert summary["skipped"] == {"binary": 2, "too_large": 1, "symlink": 3, "submodule": 0}
    assert summary["not_utf8"] == 1
    assert summary["commit"] == gitrepo.git(repo, "rev-parse", "HEAD").strip()
    lossy = db.execute("SELECT b.lossy, b.content FROM blobs b JOIN files f ON f.sha = b.sha"
                       " WHERE f.path = 'latin1.txt'").fetchone()
    assert lossy == (True, "caf\ufffd na\ufffdve\n")
    lang = db.execute("SELECT language FROM files WHERE path = 'pkg0/sub0/module_0.py'").fetchone()
    assert lang == ("python",)

    from tasks.search import search

    matches = search(db, gitrepo.MARKER, repo="big")
    assert [(m.path, m.line) for m in matches] == [("marker/found.txt", 2)]
    ledger = db.execute("SELECT state, counts->>'files', cleanup->>'outcome' FROM runs"
                        " WHERE job_id = %s", (res.id,)).fetchall()
    assert ledger == [("succeeded", str(len(expected)), "succeeded")]
    # every phase reported, in order, each with its own done/total (README "Enqueueing")
    from tasks.indexer import PHASES

    lines = [ln.split("phase: ", 1)[1] for ln in worker.log().splitlines()
             if f"job={res.id}" in ln and "phase: " in ln]
    assert [ln.split(" (", 1)[0] for ln in lines] == list(PHASES), lines
    assert lines[0].startswith("reading tree (0/0)")
    assert lines[2].startswith(f"storing (0/{len(expected)})")


def test_reindex_reads_only_changed_blobs(worker: WorkerProcess, celery_app: Any,
                                          db: psycopg.Connection[Any], roots: Path) -> None:
    """Changing 3 files reads exactly 3 blobs; no change reads none."""
    repo = roots / "incremental"
    gitrepo.generated(repo, files=300)
    first = run(celery_app, "repoindex.index_repository", source=str(repo)).result
    assert first["read"] > 300
    for i in (1, 2, 3):
        gitrepo.write(repo / f"pkg{i}" / f"sub{i}" / f"module_{i}.py", f"changed {i}\n")
    gitrepo.commit(repo)
    second = run(celery_app, "repoindex.index_repository", source=str(repo)).result
    assert (second["read"], second["indexed"], second["removed"]) == (3, 3, 3)
    assert second["unchanged"] == second["files"] - 3
    third = run(celery_app, "repoindex.index_repository", source=str(repo)).result
    assert (third["read"], third["indexed"], third["removed"]) == (0, 0, 0)
    assert set(files_of(db, "incremental")) == gitrepo.tracked(repo)


def test_same_repository_twice_at_once(worker: WorkerProcess, celery_app: Any,
                                       db: psycopg.Connection[Any], roots: Path) -> None:
    """Two jobs for one repository both succeed, one after the other: never interleaved."""
    repo = roots / "twice"
    gitrepo.generated(repo, files=400)
    jobs = [celery_app.send_task("repoindex.index_repository",
                                 kwargs={"source": str(repo), "name": "twice"}) for _ in range(2)]
    results = [j.get(timeout=120) for j in jobs]
    reads = sorted(r["read"] for r in results)
    assert reads[0] == 0 and reads[1] > 400
    assert {r["files"] for r in results} == {len(gitrepo.tracked(repo))}
    assert set(files_of(db, "twice")) == gitrepo.tracked(repo)
    runs = db.execute("SELECT started_at, finished_at FROM runs WHERE job_id = ANY(%s)"
                      " ORDER BY started_at", ([j.id for j in jobs],)).fetchall()
    assert len(runs) == 2


BAD_INPUTS = [
    ({"source": "/definitely/not/here"}, "outside the allowed roots"),
    ({"source": "{roots}/missing"}, "source path does not exist"),
    ({"source": "/etc"}, "outside the allowed roots"),
    ({"source": "{roots}/../../etc"}, "outside the allowed roots"),
    ({"source": "{roots}/plain"}, "not a git repository"),
    ({"source": "{roots}/good", "ref": "no-such-branch"}, "unknown ref 'no-such-branch'"),
    ({"source": "{roots}/good", "ref": "--upload-pack=touch /tmp/x"}, "invalid ref"),
    ({"source": "https://127.0.0.1:9/nothing.git"}, "git clone"),
    ({"source": "ext::sh -c touch% /tmp/pwned"}, "transport 'ext':: is not allowed"),
    ({"source": "--upload-pack=touch /tmp/x"}, "must not start with '-'"),
    ({"source": "ftp://example.com/repo.git"}, "URL scheme 'ftp' is not allowed"),
    ({"source": 42}, "source must be a string, got int"),
    ({"source": "{roots}/good", "name": ["x"]}, "name must be a string"),
    ({"source": "{roots}/good", "colour": "blue"}, "unknown argument 'colour'"),
    ({}, "missing required argument 'source'"),
    ({"source": "relative/path"}, "absolute path or a https, ssh, git or file URL"),
]


@pytest.fixture(scope="module")
def good_repo(roots: Path) -> Path:
    (roots / "plain").mkdir(exist_ok=True)
    repo = gitrepo.init(roots / "good")
    gitrepo.write(repo / "hello.txt", "hello world\n")
    gitrepo.commit(repo)
    return repo


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS,
                         ids=[m for _, m in BAD_INPUTS])
def test_bad_input_fails_clearly(worker: WorkerProcess, celery_app: Any,
                                 db: psycopg.Connection[Any], roots: Path, good_repo: Path,
                                 kwargs: dict[str, Any], message: str) -> None:
    """A clear one-line reason in the job status and the ledger; nothing written."""
    kwargs = {k: v.format(roots=roots) if isinstance(v, str) else v for k, v in kwargs.items()}
    repos_before = db.execute("SELECT count(*) FROM repositories").fetchone()
    res = run(celery_app, "repoindex.index_repository", **kwargs)
    assert res.state == "FAILURE"
    assert message in str(res.result)
    assert "\n" not in str(res.result)
    ledger = db.execute("SELECT state, error FROM runs WHERE job_id = %s", (res.id,)).fetchone()
    assert ledger is not None and ledger[0] == "failed" and message in ledger[1]
    assert db.execute("SELECT count(*) FROM repositories").fetchone() == repos_before


def test_worker_keeps_working_after_bad_input(worker: WorkerProcess, celery_app: Any,
                                              good_repo: Path) -> None:
    res = run(celery_app, "repoindex.index_repository", source=str(good_repo), name="good")
    assert res.state == "SUCCESS" and res.result["files"] == 1
    assert worker.proc is not None and worker.proc.poll() is None


def test_send_task_by_name_without_our_code(worker: WorkerProcess, good_repo: Path,
                                            session_env: dict[str, str]) -> None:
    """Another service enqueues by name with plain Celery; it never imports our packages."""
    script = textwrap.dedent(f"""
        import json, sys
        from celery import Celery
        app = Celery(broker={session_env['REDIS_URL']!r}, backend={session_env['REDIS_URL']!r})
        r = app.send_task("repoindex.index_repository",
                          kwargs={{"source": {str(good_repo)!r}, "name": "by-name"}})
        result = r.get(timeout=60)
        assert not any(m.split(".")[0] in ("workers", "tasks", "celeryconfig")
                       for m in sys.modules), "imported our code"
        print(json.dumps(result))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd="/", timeout=120, env={"PATH": os.environ["PATH"]}, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["repository"] == "by-name" and result["files"] == 1


def test_delete_repository_removes_only_its_blobs(worker: WorkerProcess, celery_app: Any,
                                                  db: psycopg.Connection[Any],
                                                  roots: Path) -> None:
    """Blobs shared with another repository stay; blobs only it referenced go, with their
    line rows; garbage collection takes what a re-index left unreferenced."""
    a, b = gitrepo.init(roots / "del-a"), gitrepo.init(roots / "del-b")
    gitrepo.write(a / "shared.txt", "shared content\n")
    gitrepo.write(b / "shared.txt", "shared content\n")
    gitrepo.write(a / "only-a.txt", "only in a\n")
    gitrepo.commit(a)
    gitrepo.commit(b)
    for repo in (a, b):
        assert run(celery_app, "repoindex.index_repository", source=str(repo)).state == "SUCCESS"
    res = run(celery_app, "repoindex.delete_repository", name="del-a")
    assert res.result == {"repository": "del-a", "deleted": True, "files": 2, "blobs": 1}
    assert db.execute("SELECT count(*) FROM blobs WHERE content = 'shared content\n'"
                      ).fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM blobs WHERE content = 'only in a\n'"
                      ).fetchone() == (0,)
    # search's line rows go with their blob, and only with it
    assert db.execute("SELECT line, count(*) FROM lines WHERE line IN ('shared content',"
                      " 'only in a') GROUP BY line").fetchall() == [("shared content", 1)]
    again = run(celery_app, "repoindex.delete_repository", name="del-a")
    assert again.result["deleted"] is False
    # a re-index leaves the old blob unreferenced; garbage collection takes it, lines and all
    gitrepo.write(b / "shared.txt", "changed content\n")
    gitrepo.commit(b)
    assert run(celery_app, "repoindex.index_repository", source=str(b)).state == "SUCCESS"
    collected = run(celery_app, "repoindex.collect_garbage")
    assert collected.state == "SUCCESS" and collected.result["blobs"] >= 1, collected.result
    assert db.execute("SELECT line FROM lines WHERE line IN ('shared content',"
                      " 'changed content')").fetchall() == [("changed content",)]
    assert db.execute("SELECT count(*) FROM lines l WHERE NOT EXISTS"
                      " (SELECT 1 FROM blobs b WHERE b.sha = l.sha)").fetchone() == (0,)
    bad = run(celery_app, "repoindex.delete_repository", name="-rf")
    assert bad.state == "FAILURE" and "invalid repository name" in str(bad.result)


@pytest.mark.parametrize("seconds", [-1, "1", True, 3601])
def test_canary_refuses_bad_seconds(worker: WorkerProcess, celery_app: Any, seconds: Any) -> None:
    res = run(celery_app, "repoindex.canary", seconds=seconds)
    assert res.state == "FAILURE" and "seconds must be a number" in str(res.result)


def test_canary_commits_its_row(worker: WorkerProcess, celery_app: Any,
                                db: psycopg.Connection[Any]) -> None:
    res = run(celery_app, "repoindex.canary", seconds=0.2)
    assert res.state == "SUCCESS" and res.result["seconds"] >= 0.2
    assert db.execute("SELECT count(*) FROM canary WHERE job_id = %s", (res.id,)
                      ).fetchone() == (1,)
