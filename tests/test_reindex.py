"""Re-indexing by the commits' diff (issue 18): the delta path writes the same ``files``
rows and reports the same counts as the full tree diff, commit after commit of a history
with every kind of change; each fallback to the full path happens and says why.

These drive ``tasks.indexer.index_repository`` in-process (a real ResourceManager, real
git, two real PostgreSQL databases of their own: the delta and the full sequence each
read their own blobs, so ``read`` compares too); the worker path is the same function.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import devservices
from tasks import indexer, validate
from tests import gitrepo
from workers.db import Database, migrate
from workers.errors import LimitExceeded
from workers.resources import ResourceManager
from workers.settings import Settings

LIMIT = 3000  # REPOINDEX_MAX_FILE_BYTES of these tests: larger files are too_large
COUNTS = ("files", "indexed", "removed", "unchanged", "read", "bytes", "skipped", "not_utf8")
ROW = "path, sha, mode, size, language, kind, target"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Callable[..., dict[str, Any]]]:
    """index(which, source, name, ref="HEAD", **settings) -> summary, in database ``which``
    ("delta" or "full", each created for this test and dropped after it)."""
    admin = devservices.with_database(os.environ["DATABASE_URL"], "postgres")
    base = Settings.from_env()
    dbs: dict[str, Database] = {}
    names = {w: f"repoindex_reindex_{w}_{os.getpid()}" for w in ("delta", "full")}
    (tmp_path / "work").mkdir()
    try:
        for which, name in names.items():
            url = devservices.create_database(admin, name)
            with psycopg.connect(url, autocommit=True) as conn:
                migrate(conn)
            dbs[which] = Database(dataclasses.replace(base, database_url=url))
            dbs[which].open(wait=True)

        def run(which: str, source: Path, name: str, ref: str = "HEAD",
                **changes: Any) -> dict[str, Any]:
            settings = dataclasses.replace(base, **{"roots": (tmp_path,),
                                                    "max_file_bytes": LIMIT, **changes})
            args = validate.index_args([], {"source": str(source), "name": name, "ref": ref},
                                       settings.roots)
            with ResourceManager(f"op-{which}", pool=dbs[which].pool,
                                 temp_root=tmp_path / "work") as rm:
                return indexer.index_repository(rm, settings, args, job_id=f"job-{which}")

        run.databases = dbs  # type: ignore[attr-defined]
        yield run
    finally:
        for db in dbs.values():
            db.close()
        for name in names.values():
            devservices.drop_database(admin, name)


def rows(index: Callable[..., Any], which: str, name: str) -> list[tuple[Any, ...]]:
    with index.databases[which].connection() as conn:  # type: ignore[attr-defined]
        return conn.execute(f"SELECT {ROW} FROM files JOIN repositories r ON r.id = repo_id"
                            " WHERE r.name = %s ORDER BY path", (name,)).fetchall()


def stored_commit(index: Callable[..., Any], which: str, name: str) -> str | None:
    with index.databases[which].connection() as conn:  # type: ignore[attr-defined]
        row = conn.execute("SELECT commit FROM repositories WHERE name = %s", (name,)).fetchone()
        return None if row is None else row[0]


class History:
    """A work tree whose commits keep gitlinks (submodules) that ``add -A`` would drop."""

    @classmethod
    def of_files(cls, repo: Path, files: int) -> tuple[History, str]:
        """A history whose one commit holds ``f0.txt`` … (``file 0`` …), and that commit."""
        h = cls(repo)
        for i in range(files):
            h.write(f"f{i}.txt", f"file {i}\n")
        return h, h.commit("one")

    def __init__(self, repo: Path) -> None:
        self.repo = gitrepo.init(repo)
        self.links: dict[str, str] = {}

    def write(self, path: str, data: bytes | str, mode: int | None = None) -> None:
        target = self.repo / path
        if target.is_symlink() or target.is_file():
            target.unlink()
        gitrepo.write(target, data)
        if mode is not None:
            target.chmod(mode)

    def link(self, path: str, to: str) -> None:
        target = self.repo / path
        if target.is_symlink() or target.exists():
            self.remove(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(to, target)

    def remove(self, path: str) -> None:
        target = self.repo / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()

    def commit(self, message: str) -> str:
        gitrepo.git(self.repo, "add", "-A")
        for path, sha in self.links.items():
            gitrepo.git(self.repo, "update-index", "--add", "--cacheinfo", f"160000,{sha},{path}")
        gitrepo.git(self.repo, "commit", "-q", "--allow-empty", "-m", message)
        return gitrepo.git(self.repo, "rev-parse", "HEAD").strip()

    def ls_tree(self, ref: str) -> int:
        out = subprocess.run([*gitrepo.GIT, "-C", str(self.repo), "ls-tree", "-r", "-z",
                              "--full-tree", ref], check=True, capture_output=True).stdout
        return len([r for r in out.split(b"\0") if r])


def build_history(h: History) -> list[tuple[str, str]]:
    """(commit, what it changes): one kind of change or more in every commit."""
    steps: list[tuple[str, str]] = []
    for i in range(40):
        h.write(f"src/pkg{i % 4}/mod{i}.py", f"def f{i}():\n    return {i}\n")
    h.write("bin/data.bin", b"\x00\x01binary" * 20)
    h.write("big/large.txt", "x" * (LIMIT + 1))
    h.write("latin1.txt", "caf\u00e9\n".encode("latin-1"))
    h.write("run.sh", "#!/bin/sh\necho hi\n", 0o755)
    h.write("swap_me", "a file that becomes a directory\n")
    h.write("folder/inner.txt", "a directory that becomes a file\n")
    h.write("same/one.txt", "shared content\n")
    h.write("same/two.txt", "shared content\n")
    h.write("odd/new\nline.txt", "a path with a newline\n")
    h.write("odd/tab\there.txt", "a path with a tab\n")
    (h.repo / "odd").joinpath(os.fsdecode(b"bad-\xff-utf8.txt")).write_text("not utf-8 name\n")
    h.link("links/to_run", "../run.sh")
    h.link("links/abs", "/etc/passwd")
    h.links["vendor/lib"] = "1" * 40
    steps.append((h.commit("initial"), "initial"))
    for i in range(40, 45):
        h.write(f"src/new/mod{i}.py", f"added {i}\n")
    h.remove("src/pkg1/mod1.py")
    h.remove("src/pkg2/mod2.py")
    h.write("src/pkg3/mod3.py", "edited\n")
    steps.append((h.commit("adds, deletes, an edit"), "adds"))
    (h.repo / "run.sh").chmod(0o644)
    (h.repo / "src/pkg0/mod0.py").chmod(0o755)
    steps.append((h.commit("exec bit off and on"), "modes"))
    h.remove("swap_me")
    h.write("swap_me/now_inside.txt", "inside\n")
    h.remove("folder")
    h.write("folder", "now a file\n")
    steps.append((h.commit("file <-> directory"), "swaps"))
    h.link("links/to_run", "../latin1.txt")  # retarget
    h.remove("src/pkg0/mod4.py")
    h.link("src/pkg0/mod4.py", "mod0.py")  # a file becomes a symlink
    h.remove("links/abs")
    h.write("links/abs", "a symlink becomes a file\n")
    steps.append((h.commit("symlinks"), "symlinks"))
    h.links["vendor/lib"] = "2" * 40
    h.links["vendor/other"] = "3" * 40
    steps.append((h.commit("submodule moved, one added"), "gitlinks"))
    del h.links["vendor/lib"]
    h.write("vendor/lib", "a gitlink becomes a file\n")
    steps.append((h.commit("a gitlink replaced by a file"), "gitlink to file"))
    h.write("bin/data.bin", "binary becomes text\n")
    h.write("src/pkg3/mod7.py", "y" * (LIMIT + 5))  # text becomes too large
    h.write("big/large.txt", "small now\n")  # too large becomes text
    h.write("latin1.txt", b"\x00 now binary")
    steps.append((h.commit("kinds change"), "kinds"))
    h.remove("same/two.txt")
    h.write("same/three.txt", "shared content\n")
    steps.append((h.commit("a shared blob moves"), "shared"))
    steps.append((h.commit("nothing changes in the tree"), "empty"))
    h.write("src/pkg3/mod3.py", "def f3():\n    return 3\n")  # back to an earlier blob
    h.remove("src/new")
    steps.append((h.commit("revert to earlier contents"), "revert"))
    return steps


def test_delta_and_full_paths_write_the_same_rows_and_counts(
        index: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    h = History(tmp_path / "hist")
    steps = build_history(h)
    for k, (commit, what) in enumerate(steps):
        delta = index("delta", h.repo, "hist", commit)
        # the full sequence alternates REPOINDEX_MAX_FILES, which decides no row here:
        # every index of it reads the whole tree, from the same stored predecessor
        full = index("full", h.repo, "hist", commit, max_files=10_000 + k % 2)
        assert full["strategy"] == "full", what
        assert delta["strategy"] == ("full" if k == 0 else "delta"), (what, delta["reason"])
        assert {c: delta[c] for c in COUNTS} == {c: full[c] for c in COUNTS}, what
        assert rows(index, "delta", "hist") == rows(index, "full", "hist"), what
        assert delta["files"] == h.ls_tree(commit), what
    # exact counts of some steps, the same on both paths (asserted equal above)
    by_step = {}
    for k, (commit, what) in enumerate(steps):
        by_step[what] = index("delta", h.repo, f"replay{k}", commit)  # fresh: full
    assert by_step["initial"]["skipped"] == {"binary": 1, "too_large": 1, "symlink": 2,
                                             "submodule": 1}
    assert by_step["initial"]["not_utf8"] == 1
    again = index("delta", h.repo, "hist", steps[-1][0])
    assert again["strategy"] == "unchanged"
    assert (again["indexed"], again["removed"], again["read"]) == (0, 0, 0)
    assert again["unchanged"] == again["files"] == h.ls_tree(steps[-1][0])


def test_each_change_counts_exactly(index: Callable[..., dict[str, Any]],
                                    tmp_path: Path) -> None:
    """What the delta path reports for each step: only the changed paths, counted."""
    h = History(tmp_path / "hist")
    steps = build_history(h)
    got = {}
    for commit, what in steps:
        s = index("delta", h.repo, "hist", commit)
        got[what] = (s["indexed"], s["removed"], s["read"])
    assert got["adds"] == (6, 3, 6)  # 5 added, 2 deleted, 1 edited
    assert got["modes"] == (2, 2, 0)  # same blobs, other modes: nothing read
    assert got["swaps"] == (2, 2, 2)
    assert got["symlinks"] == (3, 3, 3)  # two links read, one new file
    assert got["gitlinks"] == (2, 1, 0)
    assert got["gitlink to file"] == (1, 1, 1)
    assert got["kinds"] == (4, 4, 3)  # the too-large one is never read
    assert got["shared"] == (1, 1, 0)
    assert got["empty"] == (0, 0, 0)
    assert got["revert"] == (1, 6, 0)
    with index.databases["delta"].connection() as conn:  # type: ignore[attr-defined]
        kinds = dict(conn.execute("SELECT path, kind FROM files WHERE path = ANY(%s)",
                                  (["bin/data.bin", "src/pkg3/mod7.py", "big/large.txt",
                                    "latin1.txt", "vendor/lib", "src/pkg0/mod4.py"],)))
    assert kinds == {"bin/data.bin": "text", "src/pkg3/mod7.py": "too_large",
                     "big/large.txt": "text", "latin1.txt": "binary", "vendor/lib": "text",
                     "src/pkg0/mod4.py": "symlink"}


def test_fallbacks_read_the_whole_tree_and_say_why(index: Callable[..., dict[str, Any]],
                                                   tmp_path: Path) -> None:
    h, c1 = History.of_files(tmp_path / "repo", 10)
    h.write("f0.txt", "changed\n")
    c2 = h.commit("two")
    first = index("delta", h.repo, "r", c2)
    assert (first["strategy"], first["reason"]) == ("full", "first index")
    # a force-push: the stored commit is still there, but not an ancestor
    gitrepo.git(h.repo, "reset", "-q", "--hard", c1)
    h.write("f1.txt", "rewritten\n")
    c3 = h.commit("three")
    s = index("delta", h.repo, "r", c3)
    assert s["strategy"] == "full"
    assert s["reason"] == f"the stored commit {c2[:12]} is not an ancestor of {c3[:12]}"
    assert (s["indexed"], s["removed"], s["read"]) == (2, 2, 2)  # f0 and f1, both new blobs
    # the stored commit pruned away (a force-push and gc, a shallow clone)
    gitrepo.git(h.repo, "reset", "-q", "--hard", c1)
    h.write("f2.txt", "again\n")
    c4 = h.commit("four")
    gitrepo.git(h.repo, "reflog", "expire", "--expire=now", "--all")
    gitrepo.git(h.repo, "gc", "-q", "--prune=now")
    s = index("delta", h.repo, "r", c4)
    assert s["strategy"] == "full"
    assert s["reason"] == f"the stored commit {c3[:12]} is missing from the repository"
    assert (s["indexed"], s["removed"], s["read"]) == (2, 2, 1)
    # another source under the same name
    other = tmp_path / "other"
    gitrepo.git(tmp_path, "clone", "-q", str(h.repo), str(other))
    h2 = History(other)
    h2.write("f3.txt", "in the clone\n")
    c5 = h2.commit("five")
    s = index("delta", other, "r", c5)
    assert (s["strategy"], s["reason"]) == ("full", "the stored index is of another source")
    assert (s["indexed"], s["removed"], s["read"]) == (1, 1, 1)
    # the same commit, nothing changed: nothing read, the stored counts
    s = index("delta", other, "r", c5)
    assert (s["strategy"], s["reason"]) == ("unchanged", "the stored index is of this commit")
    assert (s["files"], s["unchanged"], s["indexed"], s["read"]) == (10, 10, 0, 0)


def test_a_changed_size_limit_rewrites_the_rows_it_decides(
        index: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    h = History(tmp_path / "repo")
    h.write("small.txt", "small\n")
    h.write("large.txt", "z" * (LIMIT + 10))
    commit = h.commit("one")
    s = index("delta", h.repo, "r", commit)
    assert s["skipped"]["too_large"] == 1
    s = index("delta", h.repo, "r", commit, max_file_bytes=LIMIT * 2)
    assert s["strategy"] == "full"
    assert s["reason"] == "REPOINDEX_MAX_FILE_BYTES changed since the stored index"
    assert (s["indexed"], s["removed"], s["read"], s["skipped"]["too_large"]) == (1, 1, 1, 0)
    assert [r[5] for r in rows(index, "delta", "r")] == ["text", "text"]
    s = index("delta", h.repo, "r", commit, max_file_bytes=LIMIT * 2)
    assert s["strategy"] == "unchanged"


def test_a_delta_over_the_file_limit_writes_nothing(index: Callable[..., dict[str, Any]],
                                                    tmp_path: Path) -> None:
    h, c1 = History.of_files(tmp_path / "repo", 5)
    assert index("delta", h.repo, "r", c1, max_files=6)["files"] == 5
    h.write("f5.txt", "six\n")
    h.write("f6.txt", "seven\n")
    c2 = h.commit("two")
    with pytest.raises(LimitExceeded, match=r"more than 6 files \(REPOINDEX_MAX_FILES\)"):
        index("delta", h.repo, "r", c2, max_files=6)
    assert stored_commit(index, "delta", "r") == c1
    assert len(rows(index, "delta", "r")) == 5
