"""What git would read for a local source, checked against the roots, and the git dir it
reads through instead of the repository's own.

A repository's files are untrusted: its ``.git`` may be a symlink or a ``gitdir:`` file
pointing elsewhere, its ``commondir``, ``objects``, ``refs`` or alternates may lead outside
``REPOINDEX_ROOTS``, and its ``config`` can make git run commands (a promisor remote's
``uploadpack``, ``core.gitProxy``, ...). So git never opens the repository itself:
``locate`` finds every path git would read without running git, refuses the source unless
each resolves under the roots, and ``shadow`` builds a git dir of our own in the
operation's temp area — our ``config`` (only the format version and object format),
a copy of ``HEAD``, and symlinks to the checked ``objects``, ``refs`` and
``packed-refs``. Nothing the repository configures is read by git, so nothing it
configures can run, and no partial clone is ever fetched from (a missing object is an
error, not a download).

The checks see the files as they are when the operation starts: someone who can rename
directories under the roots *while* an operation runs races them (README: threat model).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.errors import SourceError

MAX_ALTERNATE_DEPTH = 5  # git's own limit (sha1-file.c: "alternate ref chain too deep")
# extensions git 2.39 understands whose meaning is carried into the shadow config or that
# do not change how objects and refs are read; any other extension is refused
_EXTENSIONS_KEPT = {"objectformat"}
_EXTENSIONS_HARMLESS = {"partialclone", "worktreeconfig", "preciousobjects", "noop"}


@dataclass(frozen=True)
class Layout:
    """The resolved paths git reads for one local repository, all under the roots."""

    git_dir: Path
    common_dir: Path
    head: bytes
    object_dirs: tuple[Path, ...]  # the repository's own first, then every alternate
    refs: Path
    packed_refs: Path | None
    shallow: Path | None
    format_version: int = 0
    object_format: str = "sha1"
    partial_clone: bool = False


class _Roots:
    def __init__(self, source: Path, roots: Sequence[Path]) -> None:
        self.source = source
        self.roots = roots

    def check(self, path: Path, what: str) -> Path:
        """``path`` resolved, or SourceError naming ``what`` when it leaves the roots."""
        real = Path(os.path.realpath(path))
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            raise SourceError(f"repository {str(self.source)!r}: its {what} resolves to "
                              f"{str(real)!r}, outside the allowed roots (REPOINDEX_ROOTS)")
        return real

    def file(self, path: Path, what: str) -> Path:
        """``check``, and a regular file (a FIFO or a device would block or never end)."""
        real = self.check(path, what)
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise SourceError(f"repository {str(self.source)!r}: its {what} is not a "
                              "regular file")
        return real


def locate(source: Path, roots: Sequence[Path], *, timeout: float) -> Layout:
    """Every path git would read for ``source``, checked; SourceError otherwise."""
    inside = _Roots(source, roots)
    git_dir = inside.check(_git_dir(inside, source), "git dir")
    common = git_dir
    if (git_dir / "commondir").exists():
        pointer = inside.file(git_dir / "commondir", "commondir file")
        common = inside.check(git_dir / _read_line(pointer), "common dir (commondir)")
    head = inside.file(git_dir / "HEAD", "HEAD")
    config = _config(inside, common / "config", timeout)
    object_dirs = tuple(_object_dirs(inside, inside.check(common / "objects", "objects")))
    refs = inside.check(common / "refs", "refs")
    for directory in (*object_dirs, refs):
        _check_links(inside, directory)
    optional = {name: inside.check(common / name, name) if (common / name).exists() else None
                for name in ("packed-refs", "shallow")}
    version, extensions = _format(source, config)
    return Layout(git_dir=git_dir, common_dir=common, head=_head(head),
                  object_dirs=object_dirs, refs=refs, packed_refs=optional["packed-refs"],
                  shallow=optional["shallow"], format_version=version,
                  object_format=extensions.get("objectformat", "sha1"),
                  partial_clone="partialclone" in extensions or any(
                      k.startswith("remote.") and k.endswith(".promisor") for k in config))


def shadow(layout: Layout, target: Path) -> Path:
    """A git dir at ``target`` that reads ``layout``'s objects and refs with our config."""
    target.mkdir()
    lines = ["[core]", f"\trepositoryformatversion = {layout.format_version}",
             "\tbare = true"]
    if layout.object_format != "sha1":
        lines += ["[extensions]", f"\tobjectformat = {layout.object_format}"]
    (target / "config").write_text("\n".join(lines) + "\n")
    (target / "HEAD").write_bytes(layout.head)
    objects = target / "objects"
    objects.symlink_to(layout.object_dirs[0])
    (target / "refs").symlink_to(layout.refs)
    for name, path in (("packed-refs", layout.packed_refs), ("shallow", layout.shallow)):
        if path is not None:
            (target / name).symlink_to(path)
    return target


def _git_dir(inside: _Roots, source: Path) -> Path:
    """The git dir of a work tree (``.git`` directory or ``gitdir:`` file) or a bare one."""
    dot_git = source / ".git"
    if dot_git.exists() and not dot_git.is_dir():
        line = _read_line(inside.file(dot_git, ".git file"))
        if not line.startswith("gitdir:"):
            raise SourceError(f"not a git repository: {str(source)!r} (.git is not a gitdir file)")
        return source / line.removeprefix("gitdir:").strip()
    if dot_git.is_dir():
        return dot_git
    if (source / "HEAD").exists() and (source / "objects").is_dir() \
            and (source / "refs").is_dir():
        return source
    raise SourceError(f"not a git repository: {str(source)!r}")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def _read_line(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(4096).decode(errors="replace").strip().splitlines()[0] \
            if path.stat().st_size else ""


def _object_dirs(inside: _Roots, objects: Path) -> Iterator[Path]:
    """``objects`` and every alternate object store it names, recursively, each checked."""
    seen: set[Path] = set()
    todo = [(objects, 0)]
    while todo:
        directory, depth = todo.pop(0)
        if directory in seen:
            continue
        seen.add(directory)
        yield directory
        alternates = directory / "info" / "alternates"
        if not alternates.exists():
            continue
        if depth >= MAX_ALTERNATE_DEPTH:
            raise SourceError(f"repository {str(inside.source)!r}: alternates nest deeper "
                              f"than {MAX_ALTERNATE_DEPTH}")
        listing = inside.file(alternates, "objects/info/alternates")
        with open(listing, "rb") as f:
            text = f.read(1 << 20).decode(errors="replace")
        for raw in text.splitlines():
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.startswith('"'):
                raise SourceError(f"repository {str(inside.source)!r}: quoted alternates "
                                  "are not read")
            # git appends the entry to the real base and normalises the text (object-file.c)
            joined = Path(os.path.normpath(entry if entry.startswith("/")
                                           else f"{directory}/{entry}"))
            real = inside.check(joined, f"alternate {entry!r}")
            if real.is_dir():  # git skips (with a warning) one that does not exist
                todo.append((real, depth + 1))


def _check_links(inside: _Roots, top: Path) -> None:
    """Every symlink below ``top`` (a pack or loose object, a ref) stays under the roots;
    a linked directory is walked too, once."""
    seen: set[Path] = set()
    todo = [top]
    while todo:
        directory = todo.pop()
        if directory in seen:
            continue
        seen.add(directory)
        try:
            with os.scandir(directory) as entries:
                # a Path only for what needs one: a repository with all its objects loose
                # has one entry per object, and this walk runs on every operation
                found = [(e.path, e.is_symlink()) for e in entries
                         if e.is_symlink() or e.is_dir(follow_symlinks=False)]
        except (NotADirectoryError, FileNotFoundError):
            continue
        for raw, link in found:
            path = Path(raw)
            if link:
                real = inside.check(path, os.path.relpath(path, inside.source))
                if real.is_dir():
                    todo.append(real)
            else:
                todo.append(path)


def _config(inside: _Roots, path: Path, timeout: float) -> dict[str, str]:
    """The repository's own config file as keys and values, read by git without includes
    (nothing in it is applied: ``shadow`` writes a config of ours)."""
    if not path.exists():
        return {}
    real = inside.file(path, "config")
    try:
        done = subprocess.run(["git", "config", "--file", str(real), "--null", "--list"],
                              capture_output=True, timeout=timeout, check=False,
                              env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C",
                                   "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
                                   "HOME": "/nonexistent"}, cwd="/")
    except subprocess.TimeoutExpired:
        raise SourceError("git config timed out reading the repository's config") from None
    if done.returncode != 0:
        raise SourceError(f"repository {str(inside.source)!r}: its config cannot be read")
    pairs = (item.split("\n", 1) for item in done.stdout.decode(errors="replace").split("\0")
             if item)
    return {pair[0].lower(): pair[1] if len(pair) > 1 else "" for pair in pairs}


def _format(source: Path, config: dict[str, str]) -> tuple[int, dict[str, str]]:
    raw = config.get("core.repositoryformatversion", "0").strip() or "0"
    if raw not in ("0", "1"):
        raise SourceError(f"repository {str(source)!r}: format version {raw[:10]!r} is not "
                          "supported")
    extensions = {k.removeprefix("extensions."): v.strip().lower() for k, v in config.items()
                  if k.startswith("extensions.")}
    if raw == "1":
        unknown = sorted(set(extensions) - _EXTENSIONS_KEPT - _EXTENSIONS_HARMLESS)
        if unknown:
            raise SourceError(f"repository {str(source)!r} uses extensions.{unknown[0]}, "
                              "which repoindex does not read")
    else:
        extensions = {}  # version 0 ignores extensions, as git does
    if extensions.get("objectformat", "sha1") not in ("sha1", "sha256"):
        raise SourceError(f"repository {str(source)!r}: unknown object format")
    return int(raw), extensions
