"""A repository whose files are hostile (issue 14) read through ``tasks.git``: nothing it
configures runs, nothing outside the roots is read, nothing unverified comes back.

These drive the reader directly (a real ResourceManager, real git); the end-to-end forms
through a worker and the index are in ``tests/e2e/test_untrusted.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tasks.git import SYMLINK_MAX, Git, object_id
from tests import gitrepo, hostile
from workers.errors import SourceError
from workers.resources import ResourceManager


@pytest.fixture
def area(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(roots, outside, canary): a root, a directory outside it, a file nothing may make."""
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    roots.mkdir()
    outside.mkdir()
    yield roots, outside, tmp_path / "CANARY"


def read_all(source: Path, roots: Path, temp: Path) -> dict[str, bytes]:
    """path -> content of every blob at HEAD, as the indexer reads them."""
    temp.mkdir(exist_ok=True)
    with ResourceManager("op-untrusted", temp_root=temp) as rm:
        git = Git.open_local(rm, source, 10, (roots,))
        entries = [e for e in git.ls_tree(git.resolve("HEAD")) if e.mode != 0o160000]
        contents = dict(git.read_blobs([e.sha for e in entries], max_bytes=1 << 20))
        return {e.path.decode(): contents[e.sha] for e in entries}


def test_partial_clone_is_read_without_fetching(area: tuple[Path, Path, Path]) -> None:
    """The probe's first route: a promisor remote whose ``uploadpack`` runs a command. Git
    never fetches the missing object; the error says why it is missing."""
    roots, outside, canary = area
    origin = hostile.good(outside / "origin")
    evil = hostile.partial_clone(roots / "evil", remote_url=str(origin), extra_config={
        "remote.origin.uploadpack": f"touch {canary}; git-upload-pack"})
    with pytest.raises(SourceError, match="is missing: the repository is a partial clone and"
                                          " repoindex never fetches"):
        read_all(evil, roots, outside / "tmp")
    assert not canary.exists()


@pytest.mark.parametrize("shape", ["gitProxy", "file-url", "bare"])
def test_other_promisor_routes_run_nothing(area: tuple[Path, Path, Path], shape: str) -> None:
    """``core.gitProxy`` with a git:// promisor, a file:// promisor URL, a bare partial
    clone: each would have run the repository's script as the worker's user."""
    roots, outside, canary = area
    script = hostile.canary_script(outside, canary)
    origin = hostile.good(outside / "origin")
    url = {"gitProxy": "git://nonexistent.invalid/x", "file-url": f"file://{origin}",
           "bare": str(origin)}[shape]
    extra = {"core.gitProxy": str(script), "remote.origin.uploadpack": f"{script} git-upload-pack"}
    evil = hostile.partial_clone(roots / "evil", remote_url=url, extra_config=extra)
    if shape == "bare":
        bare = roots / "evil.git"
        os.rename(evil / ".git", bare)
        gitrepo.git(bare, "config", "core.bare", "true")
        evil = bare
    with pytest.raises(SourceError, match="partial clone"):
        read_all(evil, roots, outside / "tmp")
    assert not canary.exists()


# Keys that name a command (or a file of keys naming commands): none may run.
COMMAND_KEYS = {
    "core.fsmonitor": "{script}", "core.sshCommand": "{script}", "core.pager": "{script}",
    "core.hooksPath": "{hooks}", "core.askPass": "{script}", "core.editor": "{script}",
    "core.alternateRefsCommand": "{script}", "diff.external": "{script}",
    "diff.evil.textconv": "{script}", "filter.evil.clean": "{script}",
    "filter.evil.smudge": "{script}", "filter.evil.process": "{script}",
    "uploadpack.packObjectsHook": "{script}", "credential.helper": "!{script}",
    "alias.ls-tree": "!{script}", "alias.cat-file": "!{script}", "alias.rev-parse": "!{script}",
    "gpg.program": "{script}", "include.path": "{include}", "safe.directory": "*",
    "core.gitProxy": "{script}", "sequence.editor": "{script}",
}


@pytest.mark.parametrize("key", sorted(COMMAND_KEYS))
def test_command_keys_of_the_repository_config_run_nothing(area: tuple[Path, Path, Path],
                                                           key: str) -> None:
    """The probe's regression list: each command-running key, set in the repository's own
    config (with ``.gitattributes`` asking for the textconv/filter drivers), runs nothing,
    and the repository indexes normally."""
    roots, outside, canary = area
    script = hostile.canary_script(outside, canary)
    hooks = outside / "hooks"
    hooks.mkdir()
    for hook in ("pre-auto-gc", "post-checkout", "reference-transaction", "post-index-change"):
        (hooks / hook).symlink_to(script)
    include = outside / "included"
    include.write_text(f"[core]\n\tfsmonitor = {script}\n[alias]\n\tls-tree = !{script}\n")
    repo = hostile.good(roots / "evil", {"a.txt": "plain\n", ".gitattributes":
                                         "* diff=evil filter=evil\n"})
    value = COMMAND_KEYS[key].format(script=script, hooks=hooks, include=include)
    gitrepo.git(repo, "config", key, value)
    assert read_all(repo, roots, outside / "tmp")["a.txt"] == b"plain\n"
    assert not canary.exists()


def test_every_outside_shape_is_refused_before_an_object_is_read(
        area: tuple[Path, Path, Path]) -> None:
    """A symlinked ``.git``, a ``gitdir:`` file, ``commondir``, symlinked ``objects`` or
    ``refs``, an alternate object store, a symlinked loose object: each names the path that
    leaves the roots; no git process ever reads the outside repository."""
    roots, outside, _ = area
    shapes = hostile.outside_shapes(roots, outside)
    assert len(shapes) == 7
    for shape, source in shapes.items():
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with pytest.raises(SourceError, match="outside the allowed roots") as caught:
            read_all(source, roots, outside / "tmp")
        assert str(outside) in str(caught.value), shape
        assert "\n" not in str(caught.value)
        assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def test_links_inside_the_roots_are_followed(area: tuple[Path, Path, Path]) -> None:
    """Containment is about where paths lead, not about links: a ``.git`` symlink and an
    alternate that stay under the roots are read as git reads them."""
    roots, outside, _ = area
    real = hostile.good(roots / "real", {"shared.txt": "shared\n"})
    linked = roots / "linked"
    linked.mkdir()
    os.symlink(real / ".git", linked / ".git")
    assert read_all(linked, roots, outside / "tmp") == {"shared.txt": b"shared\n"}
    borrower = hostile.good(roots / "borrower", {"own.txt": "own\n"})
    info = borrower / ".git" / "objects" / "info"
    info.mkdir(exist_ok=True)
    (info / "alternates").write_text("../../../real/.git/objects\n")
    head = gitrepo.git(real, "rev-parse", "HEAD").strip()
    gitrepo.git(borrower, "update-ref", "refs/heads/main", head)
    assert read_all(borrower, roots, outside / "tmp") == {"shared.txt": b"shared\n"}


def test_replace_refs_are_ignored(area: tuple[Path, Path, Path]) -> None:
    """``refs/replace/<id>`` would make git hand back other content for a blob id."""
    roots, outside, _ = area
    repo = hostile.good(roots / "replacer", {"auth.py": "return check(user)\n"})
    victim = gitrepo.git(repo, "rev-parse", "HEAD:auth.py").strip()
    evil = hostile.hash_object(repo, "return True\n")
    gitrepo.git(repo, "update-ref", f"refs/replace/{victim}", evil)
    assert read_all(repo, roots, outside / "tmp") == {"auth.py": b"return check(user)\n"}


def test_an_object_that_does_not_hash_to_its_id_is_refused(
        area: tuple[Path, Path, Path]) -> None:
    """A hand-written loose object under a victim blob's name (its content is other text)."""
    roots, outside, _ = area
    victim_text = b"return check(user)\n"
    victim = object_id("sha1", b"blob", victim_text)
    repo = hostile.good(roots / "forger", {"other.txt": "x\n"})
    forged = hostile.hash_object(repo, "return True\n")
    target = hostile.loose_path(repo / ".git", victim)
    target.parent.mkdir(exist_ok=True)
    os.rename(hostile.loose_path(repo / ".git", forged), target)
    gitrepo.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{victim},auth.py")
    gitrepo.git(repo, "commit", "-q", "-m", "forge")
    with pytest.raises(SourceError, match=f"git object {victim} is corrupt: its content does "
                                          "not hash to its id"):
        read_all(repo, roots, outside / "tmp")


def test_object_larger_than_the_bound_is_not_read(area: tuple[Path, Path, Path]) -> None:
    """The size comes from the object header; a blob over the bound is refused unread."""
    roots, outside, _ = area
    repo = hostile.good(roots / "big", {"big.txt": "x" * 5000})
    sha = gitrepo.git(repo, "rev-parse", "HEAD:big.txt").strip()
    (outside / "tmp").mkdir()
    with ResourceManager("op-big", temp_root=outside / "tmp") as rm:
        git = Git.open_local(rm, repo, 10, (roots,))
        with pytest.raises(SourceError, match=f"{sha} is a blob of 5000 bytes where the tree "
                                              f"lists a blob of at most {SYMLINK_MAX}"):
            list(git.read_blobs([sha], max_bytes=SYMLINK_MAX))


@pytest.mark.parametrize("what", ["HEAD", "config", "commondir", "objects/info/alternates"])
def test_a_fifo_where_git_reads_a_file_is_refused_not_waited_on(
        area: tuple[Path, Path, Path], what: str) -> None:
    """Reading a FIFO would block the operation for ever (or until the git timeout)."""
    roots, outside, _ = area
    repo = hostile.good(roots / "fifo")
    path = repo / ".git" / what
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    with pytest.raises(SourceError, match=r"is not a regular file"):
        read_all(repo, roots, outside / "tmp")
