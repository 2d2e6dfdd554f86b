"""Repositories built by someone who controls their files (issue 14's probe), for the unit
and end-to-end hostile-repository tests. Each returns the source path to index."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import gitrepo

# built at run time: the literal never appears in a checkout the demo indexes
SECRET = "outside-" + "secret-4417"


def canary_script(directory: Path, canary: Path) -> Path:
    """An executable that leaves ``canary`` behind when anything runs it."""
    script = directory / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {canary}\nexec \"$@\"\n")
    script.chmod(0o755)
    return script


def good(path: Path, files: dict[str, str] | None = None) -> Path:
    gitrepo.init(path)
    for name, text in (files or {"a.txt": "plain\n", "missing.txt": "m\n"}).items():
        gitrepo.write(path / name, text)
    gitrepo.commit(path, "initial")
    return path


def hash_object(repo: Path, text: str) -> str:
    """Write ``text`` as a loose blob of ``repo``; its id."""
    return subprocess.run([*gitrepo.GIT, "-C", str(repo), "hash-object", "-w", "--stdin"],
                          input=text.encode(), check=True, capture_output=True
                          ).stdout.decode().strip()


def loose_path(git_dir: Path, sha: str) -> Path:
    return git_dir / "objects" / sha[:2] / sha[2:]


def partial_clone(path: Path, *, remote_url: str, extra_config: dict[str, str]) -> Path:
    """A repository that says it is a partial clone of ``remote_url`` and lacks the blob of
    ``missing.txt``: reading that blob would make git fetch it from the promisor remote."""
    good(path)
    sha = gitrepo.git(path, "rev-parse", "HEAD:missing.txt").strip()
    loose_path(path / ".git", sha).unlink()
    config = {"core.repositoryformatversion": "1", "extensions.partialClone": "origin",
              "remote.origin.url": remote_url, "remote.origin.promisor": "true",
              "remote.origin.partialclonefilter": "blob:none", **extra_config}
    for key, value in config.items():
        gitrepo.git(path, "config", key, value)
    return path


def outside_repo(outside: Path) -> Path:
    """A repository outside the roots holding SECRET."""
    return good(outside / "secret", {"secret.txt": f"{SECRET}\n"})


def outside_shapes(roots: Path, outside: Path) -> dict[str, Path]:
    """The five ways a source under the roots could make git read ``outside``'s repository."""
    secret = outside_repo(outside)
    shapes: dict[str, Path] = {}
    link = roots / "dotgit-symlink"
    link.mkdir()
    os.symlink(secret / ".git", link / ".git")
    shapes["symlinked .git"] = link
    gitfile = roots / "gitdir-file"
    gitfile.mkdir()
    (gitfile / ".git").write_text(f"gitdir: {secret / '.git'}\n")
    shapes["gitdir: file"] = gitfile
    worktree = good(roots / "worktree-commondir")
    (worktree / ".git" / "commondir").write_text(str(secret / ".git") + "\n")
    shapes["commondir"] = worktree
    objects = good(roots / "objects-symlink")
    head = gitrepo.git(secret, "rev-parse", "HEAD").strip()
    os.rename(objects / ".git" / "objects", objects / ".git" / "objects.orig")
    os.symlink(secret / ".git" / "objects", objects / ".git" / "objects")
    gitrepo.git(objects, "update-ref", "refs/heads/main", head)
    shapes["symlinked objects"] = objects
    refs = good(roots / "refs-symlink")
    subprocess.run(["rm", "-rf", str(refs / ".git" / "refs")], check=True)
    os.symlink(secret / ".git" / "refs", refs / ".git" / "refs")
    shapes["symlinked refs"] = refs
    alternates = good(roots / "alternates")
    info = alternates / ".git" / "objects" / "info"
    info.mkdir(exist_ok=True)
    (info / "alternates").write_text(str(secret / ".git" / "objects") + "\n")
    gitrepo.git(alternates, "update-ref", "refs/heads/main", head)
    shapes["alternates"] = alternates
    loose = good(roots / "loose-symlink")
    secret_blob = gitrepo.git(secret, "rev-parse", "HEAD:secret.txt").strip()
    target = loose_path(loose / ".git", secret_blob)
    target.parent.mkdir(exist_ok=True)
    os.symlink(loose_path(secret / ".git", secret_blob), target)
    gitrepo.git(loose, "update-index", "--add", "--cacheinfo", f"100644,{secret_blob},stolen.txt")
    gitrepo.git(loose, "commit", "-q", "-m", "steal")
    shapes["symlinked loose object"] = loose
    return shapes
